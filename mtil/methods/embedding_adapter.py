"""``--method embedding-adapter``: residual low-rank adapters on CLIP's final embeddings, CLIP frozen.

What seed 002 called "LoRA": one adapter on the L2-normalised image embeddings and one on the text embeddings,
``e' = normalize(e + scaling · B(A(e)))`` (rank ``--adapter-rank``, ``--adapter-scaling``, ``B = 0`` at the start
so outputs are unchanged; see :mod:`mtil.models.embedding_adapter` for why it re-normalises), plus a learnable
temperature initialised from CLIP's logit scale. Each task trains a fresh adapter with the symmetric in-batch
InfoNCE on (image, first-template prompt of its class) pairs, in which samples of the same class are not negatives
of each other (masked in both directions, each sample's own positive kept). Every CLIP parameter stays frozen.

``--train-mode`` picks the adapters: ``whole`` both, ``image`` the image adapter only, ``text`` the text adapter
only (the other embedding passes unchanged), as ``--lora`` picks encoders.

The task's dataset is evaluated with an :class:`EmbeddingAdapterHead` put into ``run.heads`` at the task's start
and kept current (its weight, the adapted template-ensemble class text features, is recomputed lazily whenever the
adapter moved), so mid-task evaluations, checkpoints and ``--eval-only --load`` use the adapted embeddings.
The adapter and temperature are this method's state (a mid-task resume copies them back in place, so the saved
optimiser state fits).

``--hard-negatives K`` adds, for each image, the K class prompts its class is most confused with as extra
negatives of the image→text direction. The confusion is a per-class running estimate (a C x C matrix): it starts
from the similarity of the frozen class prompt embeddings (row c = softmax over classes of ``s · t_c · t_k``) and
after each step each class seen in the batch moves its row toward the mean softmax over all class prompts of its
images (momentum ``--hard-negative-momentum``). A step mines from the matrix as the previous steps left it, by
class, so no index refers to another batch; the matrix is in the method's state.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mtil.engine.method import Method
from mtil.errors import UserError
from mtil.flags import add_flag, half_open_unit, non_negative_int, positive_float, positive_int
from mtil.models.embedding_adapter import (
    MAX_LOG_SCALE,
    EmbeddingAdapter,
    EmbeddingAdapterHead,
    adapted_class_weight,
)
from mtil.models.text import encode_texts
from mtil.models.backend import embed_dim
from mtil.registry import register

SEED_OFFSET = 4_099  # adapter initialisation seed = --seed + this + task index (global random streams untouched)


# ---------------------------------------------------------------------------------------------- the loss


def class_masked_infonce(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                         extra_text: torch.Tensor | None = None,
                         extra_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of B (image, prompt of its class) pairs, same-class pairs not negatives.

    ``image``, ``text``: B x D (row i of ``text`` is the prompt of image i's class); ``logits = scale · image ·
    textᵀ``. Entry (i, j), i ≠ j, with ``labels[i] == labels[j]`` is removed from both softmaxes; the loss is the
    mean of the image→text and text→image cross-entropies with the diagonal as targets. ``extra_text`` (B x K x D,
    with ``extra_valid`` B x K) are further negatives of image i's image→text softmax only.
    """
    count = labels.shape[0]
    logits = scale * image @ text.T
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    targets = torch.arange(count, device=labels.device)
    image_to_text = logits
    if extra_text is not None and extra_text.shape[1]:
        extra = scale * torch.einsum("bd,bkd->bk", image, extra_text)
        if extra_valid is not None:
            extra = extra.masked_fill(~extra_valid, float("-inf"))
        image_to_text = torch.cat([logits, extra], dim=1)
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(logits.T, targets)) / 2


def hardest_classes(confusion: torch.Tensor, k: int) -> torch.Tensor:
    """C x k: per class (row), the k other classes of largest confusion, largest first."""
    scores = confusion.clone()
    scores.fill_diagonal_(float("-inf"))
    return scores.topk(k, dim=1).indices


def hard_negative_inputs(class_text: torch.Tensor, labels: torch.Tensor,
                         hard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x K x D prompts of each image's K hardest classes, B x K validity): a hard class already in the batch is
    a negative there already, so it is not counted twice."""
    chosen = hard[labels]  # B x K class indices
    present = (chosen[..., None] == labels[None, None, :]).any(dim=-1)
    return class_text[chosen], ~present


@torch.no_grad()
def update_confusion(confusion: torch.Tensor, probabilities: torch.Tensor, labels: torch.Tensor,
                     momentum: float) -> None:
    """Each class c of the batch: ``row_c ← m · row_c + (1 − m) · mean of its images' class probabilities``."""
    for c in labels.unique():
        members = labels == c
        confusion[c] = momentum * confusion[c] + (1 - momentum) * probabilities[members].mean(dim=0)


# ---------------------------------------------------------------------------------------------- the method


@register
class EmbeddingAdapterMethod(Method):
    name = "embedding-adapter"
    summary = ("residual low-rank adapters on CLIP's normalised image and text embeddings (CLIP frozen), trained "
               "with class-masked InfoNCE")
    flag_group = ("Embedding adapter (--method embedding-adapter)",
                  "Residual low-rank maps on CLIP's final normalised embeddings plus a learnable temperature, "
                  "CLIP frozen (docs/methods/embedding-adapter.md).")
    train_modes = ("whole", "image", "text")
    train_modes_note = ("the train mode picks the adapters (whole: both, image: the image adapter, text: the text "
                        "adapter); CLIP itself never trains, so there is no linear head")
    works_with = ()  # L2 / WE / EMA / WiSE / LoRA / OGD act on CLIP's weights, which stay frozen here
    trains_instead_of_clip = True
    requires = {"hard_negative_momentum": "hard_negatives"}
    label_space_seen_refused = ("classifies each dataset through its own adapter (own image encoding and "
                                "temperature): its heads cannot be set beside other datasets'; use --label-space "
                                "dataset")

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--adapter-rank", role="shapes_optimizer", type=positive_int, default=16,
                 help="Rank r of each adapter (A: D -> r, B: r -> D); at most the embedding dimension.")
        add_flag(group, "--adapter-scaling", type=positive_float, default=2.0,
                 help="The adapter's update is scaling * B(A(e)) before re-normalising (the seed's alpha/r = "
                      "32/16).")
        add_flag(group, "--hard-negatives", type=non_negative_int, default=0, metavar="K",
                 help="Add the K class prompts each image's class is most confused with as extra negatives of the "
                      "image->text softmax (0: off); K is less than the number of classes.")
        add_flag(group, "--hard-negative-momentum", type=half_open_unit, default=0.9,
                 help="Momentum of the running per-class confusion that --hard-negatives mines from.")

    @classmethod
    def check_config(cls, config) -> None:
        if config.freeze:
            raise UserError("--method embedding-adapter keeps all of CLIP frozen (only the adapters and the "
                            "temperature train): drop --freeze")
        if config.lr_multipliers:
            raise UserError("--lr-multipliers splits CLIP's weights into parts, but --method embedding-adapter "
                            "trains none of them (only its adapters and temperature): drop --lr-multipliers")
        if config.base_new:
            raise UserError("--base-new with --method embedding-adapter is not supported: the base/new evaluation "
                            "classifies with zero-shot heads of each half, not the adapted head")
        if config.ls:
            raise UserError(f"--ls {config.ls}: --method embedding-adapter's class-masked InfoNCE has no label "
                            f"smoothing (masked entries would receive target mass): drop --ls")

    def check_inputs(self) -> None:
        """Per-task label smoothing from a sequence file, and --hard-negatives against each task's class count."""
        from mtil.datasets.fewshot import task_data
        from mtil.engine.tasks import resolve_tasks, task_settings

        config = self.config
        for spec in resolve_tasks(config):
            if task_settings(config, spec).ls:
                raise UserError(f"--sequence sets ls for {spec.dataset}, but --method embedding-adapter's InfoNCE "
                                f"has no label smoothing: remove it")
            if config.hard_negatives:
                try:
                    classes = len(task_data(config, spec.dataset).classnames)
                except UserError:
                    continue  # the data check reports a missing dataset
                if config.hard_negatives >= classes:
                    raise UserError(f"--hard-negatives {config.hard_negatives}: {spec.dataset} has {classes} "
                                    f"classes, so at most {classes - 1} other classes can be mined per class")

    def check_model(self, model) -> None:
        dim = embed_dim(model)
        if self.config.adapter_rank > dim:
            raise UserError(f"--adapter-rank {self.config.adapter_rank}: the embeddings of --model "
                            f"{self.config.model} have {dim} dimensions, so the rank is at most {dim}")

    def __init__(self, config):
        super().__init__(config)
        self.task_name: str | None = None
        self.adapter: EmbeddingAdapter | None = None
        self.head: EmbeddingAdapterHead | None = None
        self.template_features: torch.Tensor | None = None  # C x T x D frozen prompt embeddings (normalised)
        self.confusion: torch.Tensor | None = None  # C x C, --hard-negatives only
        self._stale = True  # the head's weight predates the adapter's current values

    # ------------------------------------------------------------------ task set-up
    def before_task(self, run, task) -> None:
        cfg, model = self.config, run.model
        for param in model.parameters():
            param.requires_grad_(False)
        mode = cfg.train_mode
        generator = torch.Generator().manual_seed(cfg.seed + SEED_OFFSET + run.state.task_index)
        self.adapter = EmbeddingAdapter(embed_dim(model), cfg.adapter_rank, cfg.adapter_scaling,
                                        float(model.logit_scale.detach()), image=mode in ("whole", "image"),
                                        text=mode in ("whole", "text"), generator=generator).to(run.device)
        self.task_name = task.name
        classnames, templates = task.data.classnames, task.data.templates
        was_training = model.training
        model.eval()
        with run.autocast():
            texts = [t.format(c) for c in classnames for t in templates]
            features = encode_texts(model, texts).float()
        model.train(was_training)
        self.template_features = features.view(len(classnames), len(templates), -1)
        self.confusion = None
        if cfg.hard_negatives:
            prompts = self.template_features[:, 0]
            self.confusion = torch.softmax(self.adapter.scale().detach() * prompts @ prompts.T, dim=1)
        self._stale = True
        self.head = EmbeddingAdapterHead(adapted_class_weight(self.adapter, self.template_features).detach(),
                                         self.adapter.image).to(run.device)
        self.head.attach_source(self._current_weight)
        self._stale = False
        run.heads[task.name] = self.head

    def _current_weight(self) -> torch.Tensor | None:
        if not self._stale or self.adapter is None:
            return None
        self._stale = False
        return adapted_class_weight(self.adapter, self.template_features)

    def extra_modules(self, run, task):
        return [self.adapter] if self.adapter is not None else []

    def parameter_groups(self, run, task, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The adapters at --lr and --wd; the temperature at --lr without weight decay (decay would pull the log
        temperature toward 0, i.e. the logit scale toward 1)."""
        owned = {id(p) for p in self.adapter.parameters()}
        given = [p for group in groups for p in group["params"]]
        if any(id(p) not in owned for p in given):  # pragma: no cover - CLIP is frozen in before_task
            raise RuntimeError("embedding-adapter: a CLIP parameter is trainable")
        weights = [p for n, p in self.adapter.named_parameters() if n != "log_scale"]
        return [{"params": weights, "part": "adapter"},
                {"params": [self.adapter.log_scale], "weight_decay": 0.0, "part": "temperature"}]

    # ------------------------------------------------------------------ training
    def loss(self, run, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        model, adapter = run.model, self.adapter
        was_training = model.training
        model.eval()  # frozen: no batch-norm statistics move (ResNet encoders)
        with torch.no_grad():
            features = F.normalize(model.encode_image(images).float(), dim=-1)
        model.train(was_training)
        image = adapter.adapt_image(features)
        class_text = adapter.adapt_text(self.template_features[:, 0])  # C x D: first template, as fine-tuning
        scale = adapter.scale()
        extra_text = extra_valid = None
        if self.confusion is not None:
            hard = hardest_classes(self.confusion, self.config.hard_negatives)
            extra_text, extra_valid = hard_negative_inputs(class_text, labels, hard)
            with torch.no_grad():
                probabilities = torch.softmax(scale * image @ class_text.T, dim=1).float()
            update_confusion(self.confusion, probabilities, labels, self.config.hard_negative_momentum)
        loss = class_masked_infonce(image.float(), class_text[labels].float(), labels, scale.float(),
                                    None if extra_text is None else extra_text.float(), extra_valid)
        return {"infonce": loss}

    def after_step(self, run) -> None:
        with torch.no_grad():  # CLIP's clamp of the temperature (at most 100)
            self.adapter.log_scale.clamp_(0, MAX_LOG_SCALE)
        self._stale = True

    def after_task(self, run, task) -> None:
        self._stale = True
        self.head.refresh()
        self.head.attach_source(None)
        self.head.requires_grad_(False)
        self.task_name = self.adapter = self.head = self.template_features = self.confusion = None

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Within a task: the adapters, the temperature and the hard-negative confusion (nothing between tasks:
        each task's result is its head, saved with the checkpoint's heads)."""
        if self.adapter is None:
            return {}
        return {"task": self.task_name,
                "adapter": {k: v.detach().cpu().clone() for k, v in self.adapter.state_dict().items()},
                "confusion": None if self.confusion is None else self.confusion.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After ``before_task`` of an interrupted task: copy the saved values into the live parameters (the
        optimiser holds them). At start-up, before any task, there is nothing to load into."""
        if self.adapter is None or not state or state.get("task") != self.task_name:
            return
        saved = state.get("adapter") or {}
        own = self.adapter.state_dict()
        if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
            raise UserError(f"the checkpoint's embedding-adapter state of {self.task_name} does not fit this run's "
                            f"adapters (--adapter-rank / --train-mode changed?); resume with the saved settings")
        with torch.no_grad():
            for name, value in own.items():
                value.copy_(saved[name])
        if self.confusion is not None and state.get("confusion") is not None:
            self.confusion.copy_(state["confusion"])
        self._stale = True

