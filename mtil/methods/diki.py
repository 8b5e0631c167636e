"""``--method diki``: DIKI (Tang et al., ECCV 2024, "Mind the Interference: Retaining Pre-trained Knowledge in
Parameter Efficient Continual Learning of Vision-Language Models"; docs/methods/diki.md).

CLIP stays frozen. Each task trains its own residual prefix prompts in the attention of the first ``--diki-depth``
blocks of both encoders (``--diki-length`` key and value vectors per block; :mod:`mtil.models.diki_prompts`), at
weight 1, with plain cross-entropy on ``s cos(image, class prompt)`` (the first template; every class prompt is
re-encoded with the prompts at every step). Before a task trains, the mean and covariance of its training images'
prompt-free features are stored. At test time each image picks the task of the highest Gaussian log-likelihood and
is encoded with that task's prompts at weight ``sigmoid(l / d - 1)``; the class prompts' text features under the
same task and weight come from a grid of exactly computed weights (``--diki-text-grid``).

Only the current task's prompts exist as trainable parameters: the optimiser holds them alone, and every other
task's prompts have ``requires_grad`` off (so no weight decay or momentum can move them). The schedule is the
paper's SGD at ``--diki-lr`` (default 5) for ``--diki-epochs`` epochs (default 10) unless ``--iterations`` /
``--epochs`` are given; the engine's warm-up and batch size apply (give ``--warmup-length 0 --batch-size 128`` for
the paper's). Training images are not augmented (the official code's resize and centre crop).

Evaluation: after each task starts, every evaluated dataset gets a :class:`~mtil.models.diki_prompts.DikiHead` in
``run.heads`` (``--label-space dataset``), and :meth:`Diki.task_agnostic_head` builds one over the seen tasks'
classes (``seen``). The heads share the method's prompts and statistics while training and carry a copy of them
into checkpoints, so ``--eval-only`` of a checkpoint and the next link of a one-task-per-process chain have them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from mtil.datasets.captions import CAPTION_DATASETS
from mtil.engine.method import Method
from mtil.errors import UserError
from mtil.evaluation.zeroshot import autocast_for
from mtil.flags import add_flag, positive_float, positive_int
from mtil.models.backend import embed_dim, encode_text, image_spec, raw_tokens
from mtil.models.diki_prompts import (
    ClassBlock,
    DikiHead,
    DikiKnowledge,
    PromptSites,
    TextBanks,
    gaussian_statistics,
    prefix_prompts,
    prompt_sites,
)
from mtil.models.text import tokenize
from mtil.models.transforms import eval_transform
from mtil.registry import register

SEED_OFFSET = 4_099  # prompt initialisation seed = --seed * SEED_STRIDE + this + task index
SEED_STRIDE = 1_000_003
TEMPLATES = ("first", "all")


@register
class Diki(Method):
    name = "diki"
    summary = ("DIKI: per-task residual prefix prompts in both encoders of a frozen CLIP, chosen and weighted per "
               "test image by each task's Gaussian likelihood of its features")
    flag_group = ("DIKI (--method diki)",
                  "Residual prefix prompts per task on a frozen CLIP, calibrated at test time by per-task Gaussian "
                  "statistics (docs/methods/diki.md). SGD (momentum --momentum, weight decay --wd: 0 by default, as "
                  "the paper) at --diki-lr; the paper also used --batch-size 128 and --warmup-length 0.")
    train_modes = ("whole",)
    train_modes_note = "it freezes CLIP and trains its own prompts in both encoders"
    works_with = ()
    # The loss is the mean cross-entropy over each rank's equal share (the class prompts are the same on every
    # rank), so DDP's average is the global batch's gradient; the statistics are rank 0's, broadcast.
    supports_distributed = True

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--diki-depth", role="shapes_optimizer", type=positive_int, default=8, metavar="N",
                 help="Prompted blocks: the first N of each encoder (all of an encoder's blocks when it has fewer).")
        add_flag(group, "--diki-length", role="shapes_optimizer", type=positive_int, default=8, metavar="P",
                 help="Prompt vectors per prompted block and task (P keys and P values).")
        add_flag(group, "--diki-lr", type=positive_float, default=5.0,
                 help="SGD learning rate of the prompts (cosine schedule), replacing --lr and a sequence's per-task "
                      "lr.")
        add_flag(group, "--diki-epochs", type=positive_int, default=10,
                 help="Epochs per task when neither --iterations nor --epochs (nor a sequence entry) gives the "
                      "task's length.")
        add_flag(group, "--diki-text-grid", type=positive_int, default=5, metavar="K",
                 help="Text features at test time: computed exactly at K weights 0, 1/(K-1), ..., 1 of each task's "
                      "prompts (0: CLIP's own) and interpolated at each image's weight (at least 2).")
        add_flag(group, "--diki-eval-templates", choices=list(TEMPLATES), default="first",
                 help="Class prompts at test time: the first template (the official code's, as in training) or the "
                      "average over all of a dataset's templates.")

    @classmethod
    def sets_task_length(cls, config) -> bool:
        return config.iterations is None and config.epochs is None

    @classmethod
    def check_config(cls, config) -> None:
        typed = set(getattr(config, "_cli", ())) | set(getattr(config, "_file", ()))
        if "lr" in typed:
            raise UserError("--method diki trains its prompts with SGD at --diki-lr (default 5, the paper's), which "
                            "replaces --lr: give --diki-lr")
        if "optimizer" in typed and config.optimizer != "sgd":
            raise UserError(f"--method diki trains with SGD (the paper's optimiser), not --optimizer "
                            f"{config.optimizer}: drop --optimizer")
        if "diki_epochs" in typed and (config.iterations is not None or config.epochs is not None):
            given = "--iterations" if config.iterations is not None else "--epochs"
            raise UserError(f"--diki-epochs is --method diki's task length when none is given, and {given} gives "
                            f"one: give one of them")
        if config.diki_text_grid < 2:
            raise UserError(f"--diki-text-grid {config.diki_text_grid}: the grid needs at least its two ends (0 and "
                            f"1): give 2 or more")
        if config.freeze:
            raise UserError("--method diki freezes all of CLIP and trains only its prompts: drop --freeze")
        if config.lr_multipliers:
            raise UserError("--method diki trains only its prompts, which belong to no part of CLIP: drop "
                            "--lr-multipliers")
        if getattr(config, "base_new", False):
            raise UserError("--method diki classifies each dataset with all its classes through its calibration, and "
                            "--base-new evaluates halves with zero-shot heads: drop --base-new")

    def __init__(self, config):
        super().__init__(config)
        self.knowledge: DikiKnowledge | None = None
        self.task_names: list[str] = []  # the knowledge's tasks, in order
        self.current: int | None = None  # index of the task in training
        self.banks = TextBanks()
        self.blocks: dict[tuple[str, str], ClassBlock] = {}
        self.tokens: torch.Tensor | None = None  # the current task's class prompts (first template), trimmed
        self.sites: PromptSites | None = None  # the prompted attention modules of the run's model

    # ------------------------------------------------------------------ checks
    def check_model(self, model) -> None:
        prompt_sites(model, self.config.diki_depth, model_name=self.config.model)

    # ------------------------------------------------------------------ the task
    def train_items(self, run, task) -> tuple[Any, Any, None]:
        """The task's training images, resized and centre-cropped (the official code does not augment)."""
        return task.data.raw("train"), eval_transform(image_spec(run.model)), None

    def task_steps(self, run, task, steps: int) -> int:
        if steps:
            return steps
        raw = task.data.raw("train")
        return self.config.diki_epochs * math.ceil(len(raw) / task.settings.batch_size)

    def _new_knowledge(self, run) -> DikiKnowledge:
        sites = prompt_sites(run.model, self.config.diki_depth, model_name=self.config.model)
        return DikiKnowledge(len(sites.image), len(sites.text), self.config.diki_length, sites.image_width,
                             sites.text_width, embed_dim(run.model))

    def _prepare_knowledge(self, run) -> DikiKnowledge:
        """The knowledge, on the run's device: the resumed state's, a chain's (from the ``--load``ed checkpoint's
        DIKI heads), else a new one."""
        completed = [n for n in run.state.completed if n not in CAPTION_DATASETS]
        if self.knowledge is None and completed:
            head = next((h for h in run.heads.values() if isinstance(h, DikiHead)), None)
            if head is None or len(head.knowledge) != len(completed):
                raise UserError(f"this run continues a --method diki sequence that trained {', '.join(completed)}, "
                                f"but its checkpoint holds no DIKI head with their prompts: continue from the "
                                f"checkpoint of a DIKI run that evaluated at least one dataset")
            self.knowledge = DikiKnowledge.from_tensors(head.knowledge.cpu_tensors())
            self.task_names = completed
        if self.knowledge is None:
            self.knowledge = self._new_knowledge(run)
        wanted, have = self._new_knowledge(run).shape(), self.knowledge.shape()
        if wanted != have:
            raise UserError(f"the saved DIKI prompts have the layout {have}, this command asks for {wanted} "
                            f"(--diki-depth / --diki-length): use the run's own settings")
        self.knowledge.to(run.device)
        return self.knowledge

    @torch.no_grad()
    def _statistics(self, run, task) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the task's training images' normalised features from the prompt-free CLIP (the
        images as the evaluation sees them); several processes: rank 0's."""
        cfg, model = self.config, run.model
        images = task.data.dataset("train", eval_transform(image_spec(model)))
        loader = torch.utils.data.DataLoader(images, batch_size=cfg.batch_size_eval, shuffle=False,
                                             num_workers=cfg.workers, pin_memory=run.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(cfg.seed))
        was_training = model.training
        model.eval()
        features = []
        for batch, _ in loader:
            with run.autocast():
                features.append(F.normalize(model.encode_image(batch.to(run.device)).float(), dim=-1))
        model.train(was_training)
        mean, cov = gaussian_statistics(torch.cat(features))
        shared = run.parallel.broadcast_tensors({"mean": mean, "cov": cov}, run.device)
        return shared["mean"], shared["cov"]

    def before_task(self, run, task) -> None:
        cfg, model = self.config, run.model
        for param in model.parameters():  # CLIP is frozen: only the prompts train
            param.requires_grad_(False)
        knowledge = self._prepare_knowledge(run)
        position = len([n for n in run.state.completed if n not in CAPTION_DATASETS])
        if task.name in self.task_names:  # resumed mid-task: the checkpoint's statistics and prompts
            index = self.task_names.index(task.name)
        else:
            if len(self.task_names) != position:
                raise UserError(f"the DIKI state holds {len(self.task_names)} tasks ({', '.join(self.task_names)}) "
                                f"where {position} were trained before {task.name}: resume from another checkpoint")
            mean, cov = self._statistics(run, task)
            seed = (cfg.seed * SEED_STRIDE + SEED_OFFSET + run.state.task_index) % (2 ** 63)
            knowledge.add_task(mean, cov, torch.Generator().manual_seed(seed))
            self.task_names.append(task.name)
            index = len(self.task_names) - 1
        self.current = index
        knowledge.train_only(index)
        knowledge.bump()
        self.sites = knowledge.sites(model)
        classes = [task.data.templates[0].format(c) for c in task.data.classnames]
        self.tokens = tokenize(model, classes).to(run.device)
        self._install_heads(run)
        shape = knowledge.shape()
        per_task = sum(p.numel() for p in knowledge.tasks[index].parameters() if p.requires_grad)
        tasks = len(run.state.sequence)
        message = (f"DIKI on {task.name}: {per_task:,} trainable parameters (this task's prompts: "
                   f"{shape['image_layers']} image and {shape['text_layers']} text blocks x {shape['length']} keys "
                   f"and values of width {shape['image_width']}/{shape['text_width']}); {per_task * tasks:,} over "
                   f"the sequence's {tasks} tasks; CLIP frozen")
        if run.parallel.is_main:
            print(message, flush=True)
        run.log.info(message)

    def extra_modules(self, run, task) -> list[torch.nn.Module]:
        return [self.knowledge.tasks[self.current]] if self.knowledge is not None and self.current is not None \
            else []

    def optimizer(self, run, task, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """SGD over the current task's prompts (the engine's groups hold exactly them)."""
        return torch.optim.SGD(groups, lr=self.config.diki_lr, momentum=self.config.momentum,
                               weight_decay=task.settings.wd)

    def loss(self, run, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        model, knowledge = run.model, self.knowledge
        keys, values = knowledge.task_prompts(self.current, "image")
        with prefix_prompts(self.sites.image, keys, values):
            image = F.normalize(model.encode_image(images), dim=-1)
        keys, values = knowledge.task_prompts(self.current, "text")
        with prefix_prompts(self.sites.text, keys, values):
            text = F.normalize(encode_text(model, self.tokens), dim=-1)
        logits = model.logit_scale.exp().detach() * image @ text.T
        return {"ce": F.cross_entropy(logits, labels, label_smoothing=run.task.settings.ls)}

    def after_step(self, run) -> None:
        self.knowledge.bump()  # the prompts moved: cached text features are stale

    def after_task(self, run, task) -> None:
        self.knowledge.train_only(None)
        self.knowledge.bump()
        self.current = None
        self.tokens = None

    # ------------------------------------------------------------------ evaluation
    def _block(self, run, dataset: str) -> ClassBlock:
        key = (dataset, self.config.diki_eval_templates)
        if key not in self.blocks:
            data = run.evaluator.task(dataset)
            templates = data.templates[:1] if self.config.diki_eval_templates == "first" else list(data.templates)
            texts = [template.format(c) for c in data.classnames for template in templates]
            self.blocks[key] = ClassBlock(dataset, raw_tokens(run.model, texts), len(templates))
        return self.blocks[key]

    def _head(self, run, datasets: list[str]) -> DikiHead:
        evaluator = run.evaluator
        return DikiHead(self.knowledge, [self._block(run, d) for d in datasets], self.config.diki_text_grid,
                        float(run.model.logit_scale.detach().exp()), banks=self.banks, model=run.model,
                        autocast=lambda: autocast_for(evaluator.device, evaluator.autocast_dtype))

    def _install_heads(self, run) -> None:
        """A calibrated head for every evaluated dataset (``--label-space dataset``), sharing the live state."""
        names = self.config.eval_datasets or run.state.sequence
        for name in names:
            if name not in CAPTION_DATASETS:
                run.heads[name] = self._head(run, [name])

    def task_agnostic_head(self, run, dataset: str, layout: list[str]) -> DikiHead | None:
        """``--label-space seen``: the calibrated head over the classes of every dataset of ``layout``."""
        if self.knowledge is None or not len(self.knowledge):
            return None
        return self._head(run, list(layout))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.task_names),
                "knowledge": self.knowledge.cpu_tensors() if self.knowledge is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """At start-up: every task's prompts and statistics; after ``before_task`` of an interrupted task: the same
        values copied into the live parameters (the optimiser holds those)."""
        tensors, names = state.get("knowledge"), state.get("tasks")
        if tensors is None:
            return
        if not isinstance(tensors, dict) or not isinstance(names, list):
            raise UserError("the checkpoint's DIKI state is damaged (no task list or tensors); resume from another "
                            "checkpoint or start over")
        try:
            if self.knowledge is not None and self.task_names == names:
                self.knowledge.load_tensors(tensors)
            else:
                self.knowledge = DikiKnowledge.from_tensors(tensors)
                self.task_names = list(names)
        except ValueError as exc:
            raise UserError(f"the checkpoint's DIKI state does not fit ({exc}); resume with the run's own "
                            f"settings") from None
