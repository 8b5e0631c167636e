"""``--method ast``: CLIP-AST, adaptive selective fine-tuning (Zhang et al., CVPR 2025), two stages per task.

**Stage 1** (in ``before_task``, on a deep copy of the current model, which is then dropped): every tensor of the
residual blocks of both encoders (``visual.transformer.resblocks.*``, ``transformer.resblocks.*``, or open_clip
SigLIP's ``text.transformer.resblocks.*``; 12 per CLIP block) trains with cross-entropy on the task's training
stream for ``--stage1-epochs`` passes, under AdamW with the reference's settings (lr ``--stage1-lr``, weight decay
1e-4, eps 1e-5, betas 0.9/0.999, constant lr). Each tensor's score is ``mean(1 / sqrt(v + eps))`` of AdamW's
second moment ``v`` (``exp_avg_sq``, eps 1e-5), and
``--k`` tensors are selected in every block of each encoder: by default the highest scores (``--ast-rank
smallest-v``), else the lowest (``largest-v``), or ``--k`` at random (``--random-selection``, its own seed; stage
1 is then skipped: it could not change the result).

**Stage 2** (the engine's loop, from the task-start weights: stage 1 never touched them) trains only the selected
tensors, with ``CE + λ_img · L1(f_I, f_I⁰) + λ_txt · L1(f_T, f_T⁰) + λ_kl · KL(p⁰ ‖ p)`` (``--lmbd``), where ⁰ is
a frozen copy of the task-start model, features are L2-normalised, the L1 terms are means and the KL is summed
and divided by the number of logits (the reference's self-consistency losses, written as PromptSRC does).

The selection of each task is written to ``<save>/ast_selection_<Dataset>.json`` and kept in the method's state
(with the selected tensors' task-start values, from which a resumed task rebuilds its teacher), so a resumed run
neither repeats stage 1 nor re-selects: it continues stage 2 exactly.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtil.models.backend import encode_text
from mtil.atomic import atomic_open
from mtil.engine.data_stream import batch_stream
from mtil.engine.method import Method
from mtil.engine.precision import grad_scaler
from mtil.engine.weights import load_into
from mtil.errors import UserError
from mtil.evaluation.metrics_io import safe_name
from mtil.flags import add_flag, positive_float, positive_int, seed_int
from mtil.methods.distillation import frozen_copy
from mtil.models.text import tokenize
from mtil.models.train_modes import PromptClassifier
from mtil.registry import register

# The residual blocks of either encoder: OpenAI's names (clip-anytorch and open_clip's CLIP), and open_clip's
# CustomTextCLIP (SigLIP) whose text tower lives under ``text.``
BLOCK = re.compile(r"^(visual\.transformer|transformer|text\.transformer)\.resblocks\.(\d+)\.")
STAGE1_WEIGHT_DECAY = 1e-4
STAGE1_EPS = 1e-5  # AdamW's eps in stage 1, and the eps of the importance score
STAGE1_BETAS = (0.9, 0.999)
STAGE1_STREAM = 2_000_000  # stage 1's batch streams never collide with training (or reference) streams
RANKS = ("smallest-v", "largest-v")
DEFAULT_LMBD = (0.5, 0.5, 1.0)


class LossWeights(argparse.Action):
    """``--lmbd A B C`` (or ``--lmbd=A,B,C``, the form a ``--config`` file gives): three weights of 0 or more."""

    def __call__(self, parser, namespace, values, option_string=None):
        parts = [p for v in values for p in re.split(r"[,\s]+", v.strip()) if p]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise argparse.ArgumentError(self, f"expected three numbers (image L1, text L1, KL), got "
                                               f"{' '.join(values)!r}") from None
        if len(weights) != 3:
            raise argparse.ArgumentError(self, f"expected three weights (image L1, text L1, KL), got {len(weights)}")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise argparse.ArgumentError(self, f"weights must be numbers of 0 or more, got {' '.join(parts)}")
        setattr(namespace, self.dest, weights)


# ---------------------------------------------------------------------------------------------- selection


def blocks_of(model: nn.Module) -> dict[str, list[str]]:
    """Block id (``visual.0``, ``text.3``) -> the names of its parameter tensors, in the model's order."""
    blocks: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        match = BLOCK.match(name)
        if match:
            encoder = "visual" if match.group(1).startswith("visual") else "text"
            blocks.setdefault(f"{encoder}.{match.group(2)}", []).append(name)
    return blocks


@torch.no_grad()
def importance(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
               eps: float = STAGE1_EPS) -> dict[str, float]:
    """``mean(1 / sqrt(v + eps))`` per tensor, ``v`` its AdamW second moment (a tensor that never had a gradient
    has ``v = 0``, so the largest score, ``1 / sqrt(eps)``)."""
    scores = {}
    for name, param in params.items():
        v = optimizer.state.get(param, {}).get("exp_avg_sq")
        v = torch.zeros_like(param, dtype=torch.float32) if v is None else v.float()
        scores[name] = float((1.0 / torch.sqrt(v + eps)).mean())
    return scores


def select_by_score(blocks: dict[str, list[str]], scores: dict[str, float], k: int,
                    rank: str) -> dict[str, list[str]]:
    """In every block the ``k`` tensors of highest score (``smallest-v``: smallest second moments, what the public
    code's descending sort picks) or of lowest score (``largest-v``); ties go to the earlier tensor. Each block's
    list is in the model's order."""
    if rank not in RANKS:
        raise ValueError(f"unknown rank {rank!r}")
    sign = -1.0 if rank == "smallest-v" else 1.0
    selected = {}
    for block, names in blocks.items():
        order = sorted(range(len(names)), key=lambda i: (sign * scores[names[i]], i))
        selected[block] = [names[i] for i in sorted(order[:k])]
    return selected


def select_at_random(blocks: dict[str, list[str]], k: int, seed: int) -> dict[str, list[str]]:
    """``k`` tensors per block drawn uniformly, reproducibly from ``seed`` (model order within a block)."""
    generator = torch.Generator().manual_seed(seed)
    return {block: [names[i] for i in sorted(torch.randperm(len(names), generator=generator)[:k].tolist())]
            for block, names in blocks.items()}


def task_seed(seed: int, task_index: int) -> int:
    """The random selection's seed for one task of a sequence (each task draws anew, reproducibly)."""
    return int(np.random.SeedSequence([seed, task_index]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------- losses


def self_consistency(image: torch.Tensor, text: torch.Tensor, logits: torch.Tensor, frozen_image: torch.Tensor,
                     frozen_text: torch.Tensor, frozen_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three unweighted terms: L1 of image and of text features (means), ``KL(frozen ‖ tuned)`` of the class
    distributions summed and divided by the number of logits. All are exactly 0 while tuned = frozen."""
    kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(frozen_logits.float(), dim=-1),
                  reduction="sum", log_target=True) / logits.numel()
    return {"scl_image": F.l1_loss(image.float(), frozen_image.float()),
            "scl_text": F.l1_loss(text.float(), frozen_text.float()),
            "scl_kl": kl}


# ---------------------------------------------------------------------------------------------- the method


@register
class CLIPAST(Method):
    name = "ast"
    summary = ("CLIP-AST: stage 1 ranks the tensors of every block by AdamW's second moments, stage 2 trains the "
               "top --k per block with self-consistency to the frozen model")
    flag_group = ("CLIP-AST (--method ast)",
                  "Adaptive selective fine-tuning (docs/methods/ast.md). Stage 2 is the task's training (its "
                  "length --iterations / --epochs, or --stage2-epochs; its lr --lr, or --stage2-lr; mid-task "
                  "evaluation every --eval-interval steps).")
    train_modes = ("whole",)
    train_modes_note = ("it selects tensors in the blocks of both encoders and its self-consistency terms compare "
                        "both encoders' features")
    works_with = ("l2", "we", "ema", "wise_merge")
    # Stage 1 runs through DDP on each rank's share and rank 0's selection is broadcast; stage 2's terms are means
    # over images (the text term is the same on every rank), so DDP's average is the global batch's gradient.
    supports_distributed = True
    requires = {"random_selection_seed": "random_selection"}

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--k", type=positive_int, default=6,
                 help="Tensors selected per residual block of each encoder (at most the tensors of a block: 12 in "
                      "a CLIP block).")
        add_flag(group, "--ast-rank", choices=list(RANKS), default="smallest-v",
                 help="Which tensors the score mean(1/sqrt(v+eps)) of AdamW's second moment v selects: "
                      "smallest-v takes the k highest scores (the public code's descending sort, which favours "
                      "tensors with small accumulated gradients), largest-v the k lowest (what its README's "
                      "rationale, 'larger gradients matter more', describes). The default follows the code; the "
                      "sweep decides.")
        add_flag(group, "--random-selection", action="store_true",
                 help="Select --k tensors per block at random (the ablation); stage 1 is skipped.")
        add_flag(group, "--random-selection-seed", type=seed_int, default=42,
                 help="Seed of --random-selection (each task of a sequence draws from this seed and its index).")
        add_flag(group, "--stage1-epochs", type=positive_int, default=1,
                 help="Passes of stage 1 over the task's training set (batches of --batch-size).")
        add_flag(group, "--stage1-lr", type=positive_float, default=1e-5,
                 help="Stage 1's AdamW learning rate (constant; weight decay 1e-4, eps 1e-5, as the reference).")
        add_flag(group, "--stage2-epochs", type=positive_int, default=None,
                 help="Stage 2's length in epochs: N x ceil(training-set size / --batch-size) steps per task, "
                      "replacing --iterations / --epochs and a sequence's per-task length (default: those).")
        add_flag(group, "--stage2-lr", type=positive_float, default=None,
                 help="Stage 2's peak learning rate for every task, replacing --lr and a sequence's per-task lr "
                      "(--lr-multipliers still apply; default: --lr).")
        add_flag(group, "--lmbd", nargs="+", action=LossWeights, default=list(DEFAULT_LMBD), metavar="W",
                 help="Three weights of the self-consistency terms: image-feature L1, text-feature L1, "
                      "KL(frozen || tuned), e.g. --lmbd 0.5 0.5 1.0 (a weight of 0 drops its term).")

    @classmethod
    def sets_task_length(cls, config) -> bool:
        return config.stage2_epochs is not None

    @classmethod
    def check_config(cls, config) -> None:
        typed = set(getattr(config, "_cli", ())) | set(getattr(config, "_file", ()))
        defaults = getattr(config, "_defaults", {})
        if config.stage2_lr is not None and "lr" in typed:
            raise UserError("--stage2-lr is --method ast's stage-2 learning rate and replaces --lr: give one of them")
        lengths = sorted(typed & {"iterations", "epochs"})
        if config.stage2_epochs is not None and lengths:
            raise UserError(f"--stage2-epochs is --method ast's stage-2 length and replaces "
                            f"--{lengths[0]}: give one of them")
        if config.freeze:
            raise UserError("--method ast chooses the tensors that train (--k per block): drop --freeze")
        if config.random_selection:
            idle = [f"--{d.replace('_', '-')}" for d in ("stage1_epochs", "stage1_lr", "ast_rank")
                    if d in typed and getattr(config, d) != defaults.get(d, getattr(config, d))]
            if idle:
                raise UserError(f"--random-selection skips stage 1, so {', '.join(idle)} would do nothing: drop "
                                f"{'it' if len(idle) == 1 else 'them'}")

    def check_model(self, model: nn.Module) -> None:
        blocks = blocks_of(model)
        if not any(b.startswith("visual.") for b in blocks):
            kind = "a timm tower, whose blocks mtil does not name" if any(
                n.startswith("visual.trunk.") for n, _ in model.named_parameters()) else "a ResNet, which has none"
            raise UserError(f"--method ast selects tensors in the transformer blocks of both encoders, and the "
                            f"image encoder of --model {self.config.model} is {kind}: use a ViT with OpenAI's block "
                            f"names (clip-anytorch, or open_clip's native ViT)")
        fewest = min(len(names) for names in blocks.values())
        if self.config.k > fewest:
            raise UserError(f"--k {self.config.k}: the residual blocks of --model {self.config.model} have "
                            f"{fewest} tensors each, so --k is at most {fewest}")

    def __init__(self, config):
        super().__init__(config)
        self.selections: dict[str, dict[str, Any]] = {}  # task -> its selection record (the JSON's content)
        self.task_name: str | None = None  # the task in stage 2
        self.teacher: nn.Module | None = None
        self.tokens: torch.Tensor | None = None
        self._frozen_text: torch.Tensor | None = None
        self.stage1_runs = 0  # how often stage 1 ran in this process (a resumed task must not repeat it)

    # ------------------------------------------------------------------ stage 1
    def _stage1(self, run, task) -> tuple[dict[str, float], int]:
        """Train every block tensor of a copy of the model; returns (scores, steps)."""
        cfg, device = self.config, run.device
        model = copy.deepcopy(run.model).train()
        names = {n for block in blocks_of(model).values() for n in block}
        params = {}
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
            if name in names:
                params[name] = param
        optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.stage1_lr, weight_decay=STAGE1_WEIGHT_DECAY,
                                      eps=STAGE1_EPS, betas=STAGE1_BETAS)
        scaler = grad_scaler(run.precision, device)
        classifier = PromptClassifier(model, task.data.classnames, task.data.templates[0], "whole")
        raw, transform, collate = self.train_items(run, task)
        batch = task.settings.batch_size
        steps = cfg.stage1_epochs * -(-len(raw) // batch)
        parallel = run.parallel  # several processes: each its share of every batch, gradients averaged (DDP)
        loader = batch_stream(raw, transform, batch_size=batch, seed=cfg.seed,
                              stream=STAGE1_STREAM + run.state.task_index, start_step=0, total_steps=steps,
                              workers=cfg.workers, pin_memory=device.type == "cuda", collate_fn=collate,
                              rank=parallel.rank, world=parallel.world_size)

        def cross_entropy(batch) -> dict[str, torch.Tensor]:
            images, labels = batch
            with run.autocast():
                logits = classifier(images.to(device, non_blocking=True))
            return {"ce": F.cross_entropy(logits.float(), labels.to(device, non_blocking=True),
                                          label_smoothing=cfg.ls)}

        compute = parallel.wrap_losses(cross_entropy, list(params.values()), device)
        devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # stage 1 leaves the run's random streams as they were
            for step, batch_items in enumerate(loader, 1):
                loss = compute(batch_items)["ce"]
                if parallel.any(not bool(torch.isfinite(loss)), device):
                    raise UserError(f"--method ast stage 1 on {task.name}: the loss is {loss.item()} at step "
                                    f"{step}/{steps}; lower --stage1-lr")
                if cfg.log_every and (step % cfg.log_every == 0 or step == steps) and parallel.is_main:
                    line = f"[{task.name}] AST stage 1 step {step}/{steps}  ce {loss.item():.4f}"
                    print(line, flush=True)
                    run.log.info(line)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
        self.stage1_runs += 1
        return importance(optimizer, params), steps

    def _select(self, run, task) -> dict[str, Any]:
        cfg = self.config
        blocks = blocks_of(run.model)
        started = time.perf_counter()
        record: dict[str, Any] = {"task": task.name, "k": cfg.k}
        if cfg.random_selection:
            seed = task_seed(cfg.random_selection_seed, run.state.task_index)
            chosen = select_at_random(blocks, cfg.k, seed)
            record.update(mode="random", random_selection_seed=cfg.random_selection_seed, seed=seed, scores=None)
            how = f"at random (seed {cfg.random_selection_seed})"
        else:
            scores, steps = self._stage1(run, task)
            if not all(math.isfinite(s) for s in scores.values()):
                raise UserError(f"--method ast stage 1 on {task.name} gave non-finite importance scores; lower "
                                f"--stage1-lr")
            chosen = select_by_score(blocks, scores, cfg.k, cfg.ast_rank)
            record.update(mode="importance", rank=cfg.ast_rank, stage1_epochs=cfg.stage1_epochs,
                          stage1_steps=steps, stage1_lr=cfg.stage1_lr, scores=scores)
            how = f"by importance ({cfg.ast_rank}; stage 1: {steps} steps, {time.perf_counter() - started:.1f}s)"
        scores = record.pop("scores")
        record.update(blocks=chosen, selected=[n for block in chosen.values() for n in block], scores=scores)
        message = (f"AST on {task.name}: {len(record['selected'])} of {sum(map(len, blocks.values()))} block "
                   f"tensors selected {how}, {cfg.k} per block in {len(blocks)} blocks")
        if run.parallel.is_main:
            print(message, flush=True)
        run.log.info(message)
        return record

    def _write_selection(self, run, task, record: dict[str, Any]) -> None:
        if run.save_dir is None:
            return
        with atomic_open(run.save_dir / f"ast_selection_{safe_name(task.name)}.json", "w") as handle:
            json.dump(record, handle, indent=1)
            handle.write("\n")

    # ------------------------------------------------------------------ stage 2
    def before_task(self, run, task) -> None:
        record = self.selections.get(task.name)
        if record is None:  # several processes: rank 0's selection, so every rank trains the same tensors
            record = self.selections[task.name] = run.parallel.broadcast(self._select(run, task))
        else:
            message = f"AST on {task.name}: the selection saved in the checkpoint (stage 1 is not repeated)"
            if run.parallel.is_main:
                print(message, flush=True)
            run.log.info(message)
        chosen = set(record["selected"])
        params = dict(run.model.named_parameters())
        missing = sorted(chosen - set(params))
        if missing:
            raise UserError(f"the saved CLIP-AST selection of {task.name} names tensors this model lacks "
                            f"({', '.join(missing[:3])}): resume with the model the run started with")
        self._write_selection(run, task, record)
        for name, param in params.items():
            param.requires_grad_(name in chosen)
        self.task_name = task.name
        self.teacher = frozen_copy(run.model)
        self._frozen_text = None
        self.tokens = tokenize(run.model, [task.data.templates[0].format(c) for c in task.data.classnames]
                               ).to(run.device)

    def parameter_groups(self, run, task, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``--stage2-lr`` replaces the task's lr (keeping the ``--lr-multipliers`` factors)."""
        lr = self.config.stage2_lr
        if lr is None:
            return groups
        base = task.settings.lr
        return [{**group, "lr": lr * group.get("lr", base) / base} for group in groups]

    def task_steps(self, run, task, steps: int) -> int:
        """``--stage2-epochs N``: N x ceil(training-set size / batch size) steps (else the task's own length)."""
        if self.config.stage2_epochs is None:
            return steps
        raw, _, _ = self.train_items(run, task)
        return self.config.stage2_epochs * -(-len(raw) // task.settings.batch_size)

    def _teacher_text(self) -> torch.Tensor:
        if self._frozen_text is None:
            with torch.no_grad():
                self._frozen_text = F.normalize(encode_text(self.teacher, self.tokens), dim=-1)
        return self._frozen_text

    def loss(self, run, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        model, weights = run.model, self.config.lmbd
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(encode_text(model, self.tokens), dim=-1)
        logits = model.logit_scale.exp().detach() * image @ text.T
        losses = {"ce": F.cross_entropy(logits, labels, label_smoothing=self.config.ls)}
        if not any(weights):
            return losses
        with torch.no_grad():
            frozen_image = F.normalize(self.teacher.encode_image(images), dim=-1)
            frozen_text = self._teacher_text()
            frozen_logits = self.teacher.logit_scale.exp() * frozen_image @ frozen_text.T
        terms = self_consistency(image, text, logits, frozen_image, frozen_text, frozen_logits)
        for weight, (name, value) in zip(weights, terms.items()):
            if weight:
                losses[name] = weight * value
        return losses

    def after_task(self, run, task) -> None:
        self.task_name = self.teacher = self.tokens = self._frozen_text = None

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Every task's selection, and during stage 2 the selected tensors' task-start values (the teacher differs
        from the training weights only there)."""
        start = None
        if self.teacher is not None and self.task_name is not None:
            params = dict(self.teacher.named_parameters())
            start = {n: params[n].detach().cpu().clone() for n in self.selections[self.task_name]["selected"]}
        return {"selections": copy.deepcopy(self.selections), "task": self.task_name, "start": start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """At start-up: the selections (so ``before_task`` does not repeat stage 1); after ``before_task`` of an
        interrupted task: the teacher's selected tensors back to their task-start values."""
        selections = state.get("selections")
        if selections is not None:
            if not isinstance(selections, dict) or not all(
                    isinstance(r, dict) and isinstance(r.get("selected"), list) for r in selections.values()):
                raise UserError("the checkpoint's CLIP-AST state is damaged (its selections are not "
                                "{task: {'selected': [...]}}); resume from another checkpoint or start over")
            self.selections = copy.deepcopy(selections)
        start = state.get("start")
        if start and self.teacher is not None and state.get("task") == self.task_name:
            if set(start) != set(self.selections[self.task_name]["selected"]):
                raise UserError(f"the checkpoint's CLIP-AST state is damaged (its task-start tensors are not the "
                                f"selection of {self.task_name}); resume from another checkpoint or start over")
            load_into(self.teacher, start)
            self._frozen_text = None
