"""ZSCL, LwF, LwF-VR and iCaRL: fine-tuning plus distillation from a frozen teacher on reference data.

Each step draws a batch ``x_ref`` of reference images; with the teacher's features ``R_t`` of the reference
sentences (computed once per task: the teacher is frozen):

    P_t = s * f_I^teacher(x_ref) . R_t^T        P_s = s * f_I^student(x_ref) . R_t^T
    image loss = distill(P_t, P_s, T)            (softmax over sentences)
    text loss  = distill(P_t^T, P_s^T, T)        (softmax over reference images)

The subclasses differ only in the teacher, the reference images and the sentences.

Several processes (torchrun / srun): each rank draws its share of every reference batch from the seeded stream
(as the training batches), so the ranks together see the single process's reference batch. The image loss and the
feature MSE are means over rows: each rank's mean over its share, averaged by DDP, is the global mean. The text
loss (a softmax over the reference images) and the image-image ablation compare every reference image with every
other: they are computed on the whole reference batch gathered from the ranks (:meth:`Parallel.whole_batch`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mtil.datasets.captions import CAPTION_DATASETS, open_caption_dataset
from mtil.datasets.registry import open_dataset
from mtil.datasets.sentences import conceptual_captions, toy_captions
from mtil.engine.data_stream import batch_stream
from mtil.engine.weights import interpolate, load_into
from mtil.errors import UserError
from mtil.flags import add_flag, positive_float, positive_int, unit_interval
from mtil.methods.distillation import (SentenceFeatures, TeacherImageFeatures, distill, frozen_copy,
                                       random_token_sentences)
from mtil.methods.finetune import Finetune
from mtil.models.clip_loading import model_names
from mtil.models.transforms import eval_transform
from mtil.models.backend import image_spec
from mtil.registry import register

REF_STREAM_OFFSET = 1_000_000  # stream ids of reference batches never collide with training streams
# --ref-feature-cache auto keeps teacher rows for reference sets up to this size: the rows (4 bytes x embedding
# width each) stay on the device and in every checkpoint, and a set much larger than the draws (ImageNet's 1.28 M
# against 64 000 draws a task) is rarely redrawn, so it would cost memory for little saving (docs/methods/zscl.md).
CACHE_AUTO_LIMIT = 100_000


class _Images(Dataset):
    """(image, label) -> (image, index), and (image, caption) -> (image, index): reference images need no labels;
    the index keys the teacher's cached features."""

    def __init__(self, raw: Dataset):
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int):
        return self.raw[index][0], index


DISTILLATION_MODES = ("whole", "image", "image-fc", "image-fc-fixed")  # not text (docs/methods/zscl.md), not fc


class ReferenceDistillation(Finetune):
    """Fine-tuning + distillation on reference data; subclasses choose teacher, images and sentences."""

    name = "reference-distillation"
    flag_group = ("Distillation (ZSCL, LwF, LwF-VR, iCaRL)", "The distillation losses these methods share.")
    supports_distributed = True  # reference batches shared out per rank; whole-batch terms gathered (docstring)
    # The student's logits use the teacher's sentence features (as in ZSCL), so distillation acts through the
    # image encoder only: with --train-mode text it would do nothing; fc trains a head on frozen features.
    train_modes = DISTILLATION_MODES
    train_modes_note = ("the distillation acts through the image encoder (student images against the teacher's "
                        "sentence features, as in ZSCL), which text and fc freeze: it would do nothing")

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--T", type=positive_float, default=2.0, dest="T", help="Distillation temperature.")
        add_flag(group, "--image-loss", action="store_true",
                 help="Distil over sentences (softmax per reference image). Without --image-loss and --text-loss "
                      "both are on.")
        add_flag(group, "--text-loss", action="store_true",
                 help="Distil over reference images (softmax per sentence).")
        add_flag(group, "--feature-mse", action="store_true",
                 help="Add MSE between student and teacher reference image features.")
        add_flag(group, "--image-image-loss", action="store_true",
                 help="Ablation: distil image-image similarities of the reference batch (diagonal masked).")
        add_flag(group, "--weight-adjust", action="store_true", help="Halve the weights of the distillation terms.")
        add_flag(group, "--ref-batch-size", type=positive_int, default=None,
                 help="Reference images per step (default: --batch-size).")
        add_flag(group, "--ref-feature-cache", choices=["auto", "on", "off"], default="auto",
                 help="Keep the frozen teacher's features of each reference image once computed (exact: reference "
                      "images take the deterministic evaluation transform) while the teacher and the reference "
                      "data stay the same (ZSCL: the sequence; LwF, iCaRL: a task); they go into the checkpoints. "
                      f"auto: when the reference set has at most {CACHE_AUTO_LIMIT:,} images (about 200 MB of "
                      "rows for a 512-wide embedding); off: the teacher's forward at every step.")

    @classmethod
    def shared_batch_sizes(cls, config) -> dict[str, int]:
        return {"--ref-batch-size": config.ref_batch_size} if config.ref_batch_size else {}

    def __init__(self, config):
        super().__init__(config)
        self.teacher = None
        self.sentences: list[str] | torch.Tensor | None = None
        self.teacher_text = SentenceFeatures()
        self.teacher_images = TeacherImageFeatures()
        self._saved_rows = None  # the checkpoint's cached rows, until the teacher they belong to is rebuilt
        self._caching = False  # --ref-feature-cache for this task's reference set (before_task decides)
        self._ref_iter = None
        self.weight = 0.5 if config.weight_adjust else 1.0
        # neither direction named: both, as in ZSCL
        both = not config.image_loss and not config.text_loss
        self.image_loss, self.text_loss = config.image_loss or both, config.text_loss or both

    # --- what subclasses choose ------------------------------------------------------------
    def make_teacher(self, run, task):
        raise NotImplementedError

    def reference_images(self, run, task) -> Dataset | None:
        raise NotImplementedError

    def reference_sentences(self, run, task) -> list[str] | torch.Tensor:
        raise NotImplementedError

    def stable_teacher(self) -> bool:
        """Whether every task's teacher is the same frozen model (ZSCL's zero-shot or --ref-model teacher): then
        it is built once per sequence, its sentence features are encoded once for the same sentences, and it is
        left out of checkpoints (a resume rebuilds it exactly). LwF's teacher changes with every task."""
        return False

    # --- hooks ------------------------------------------------------------------------------
    def before_task(self, run, task) -> None:
        super().before_task(run, task)
        sentences = self.reference_sentences(run, task)
        if self.teacher is None or not self.stable_teacher():
            self.teacher = self.make_teacher(run, task)
            self.sentences = None
            self.teacher_images.clear()  # features of another teacher (or of another task's reference images)
            if self.stable_teacher() and self._saved_rows is not None:  # a resumed run: the same teacher's rows
                self.teacher_images.load_state_dict(self._saved_rows, run.device)
        self._saved_rows = None
        if not _same_sentences(self.sentences, sentences):
            self.sentences = sentences
            self.teacher_text.compute(self.teacher, self.sentences, run.model.context_length)
        self._ref_iter = None
        self._ref_data = self.reference_images(run, task)
        mode = self.config.ref_feature_cache
        self._caching = mode == "on" or (mode == "auto" and self._ref_data is not None
                                         and len(self._ref_data) <= CACHE_AUTO_LIMIT)

    def _next_reference_batch(self, run) -> tuple[torch.Tensor, list[int]] | None:
        """(images, their indices in the reference dataset) of this step, or None without reference data."""
        if self._ref_data is None or len(self._ref_data) == 0:
            return None
        if self._ref_iter is None:
            task = run.task
            loader = batch_stream(_Images(self._ref_data), eval_transform(image_spec(run.model)),
                                  batch_size=self.config.ref_batch_size or task.settings.batch_size,
                                  seed=self.config.seed, stream=REF_STREAM_OFFSET + run.state.task_index,
                                  start_step=run.state.step, total_steps=task.total_steps,
                                  workers=self.config.workers, pin_memory=run.device.type == "cuda",
                                  rank=run.parallel.rank, world=run.parallel.world_size)
            self._ref_iter = iter(loader)
        images, indices = next(self._ref_iter)
        return images.to(run.device, non_blocking=True), indices.tolist()

    def loss(self, run, batch: Any) -> dict[str, torch.Tensor]:
        losses = super().loss(run, batch)
        reference = self._next_reference_batch(run)
        if reference is None:
            return losses
        x_ref, indices = reference
        cfg, parallel = self.config, run.parallel
        scale = run.model.logit_scale.exp().detach()
        sentences = self.teacher_text.features
        with torch.no_grad():
            teacher_img = self._teacher_features(run, x_ref, indices)
            teacher_logits = scale * teacher_img @ sentences.T
        student_img = F.normalize(run.model.encode_image(x_ref), dim=-1)
        student_logits = scale * student_img @ sentences.T
        if self.image_loss:  # a mean over this rank's reference images
            losses["distill_image"] = self.weight * distill(teacher_logits, student_logits, cfg.T)
        if self.text_loss:  # a softmax over the whole reference batch (every rank's share)
            text = distill(parallel.whole_batch(teacher_logits).T, parallel.whole_batch(student_logits).T, cfg.T)
            losses["distill_text"] = self.weight * parallel.whole_batch_term(text)
        if cfg.feature_mse:
            losses["feature_mse"] = self.weight * F.mse_loss(student_img, teacher_img)
        if cfg.image_image_loss:
            teacher_all, student_all = parallel.whole_batch(teacher_img), parallel.whole_batch(student_img)
            mask = torch.eye(len(teacher_all), dtype=torch.bool, device=x_ref.device)
            t = (scale * teacher_all @ teacher_all.T).masked_fill(mask, -1e4)
            s = (scale * student_all @ student_all.T).masked_fill(mask, -1e4)
            losses["distill_image_image"] = self.weight * parallel.whole_batch_term(distill(t, s, cfg.T))
        return losses

    def _teacher_features(self, run, images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        if not self._caching:
            return F.normalize(self.teacher.encode_image(images).float(), dim=-1)
        features = self.teacher_images.lookup(self.teacher, images, indices)
        if run.parallel.distributed:  # every rank keeps every rank's rows, in draw order: the caches stay equal
            every = run.parallel.whole_batch(torch.tensor(indices, dtype=torch.int64, device=features.device))
            self.teacher_images.remember(every.tolist(), run.parallel.whole_batch(features))
        else:
            self.teacher_images.remember(indices, features)
        return features

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": None if self.stable_teacher() else _cpu_state(self.teacher),
                "teacher_image_features": self.teacher_images.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed task gets back the teacher it started with (e.g. LwF's end-of-previous-task model); a stable
        teacher was rebuilt as it was by before_task."""
        if state.get("teacher") is not None and self.teacher is not None and not self.stable_teacher():
            self.teacher.load_state_dict(state["teacher"])
            self.teacher_text.compute(self.teacher, self.sentences, self.teacher.context_length)
        rows = state.get("teacher_image_features")  # none in files written before the cache existed
        if self.teacher is None:  # at start-up: kept for before_task, which rebuilds the teacher
            self._saved_rows = rows
        else:  # a mid-task resume, after before_task: the rows the interrupted run had
            self.teacher_images.load_state_dict(rows, next(self.teacher.parameters()).device)


def _same_sentences(a: list[str] | torch.Tensor | None, b: list[str] | torch.Tensor) -> bool:
    if a is None or type(a) is not type(b):
        return False
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _cpu_state(model) -> dict | None:
    return None if model is None else {k: v.detach().cpu() for k, v in model.state_dict().items()}


def class_prompts(names: list[str], location, download: bool = False) -> list[str]:
    """Every template of every class of the named datasets."""
    sentences = []
    for name in names:
        data = open_dataset(name, location, download)
        sentences += [t.format(c) for c in data.classnames for t in data.templates]
    return sentences


class _DrawnSentences(ReferenceDistillation):
    """Methods whose reference sentences can be drawn (random tokens, ToyCaptions): they own the count."""

    flag_group = ("Drawn reference sentences (ZSCL, LwF-VR)", "How many sentences are drawn.")

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--ref-sentences-count", type=positive_int, default=5000,
                 help="How many random-token / ToyCaptions sentences to draw (ZSCL's --ref-sentences random and "
                      "ToyCaptions; LwF-VR's random sentences).")


@register
class ZSCL(_DrawnSentences):
    """Teacher = the zero-shot model (or ``--ref-model``, or a WiSE blend with ``--ref-wise``); reference images
    from ``--ref-dataset``; sentences from ``--ref-sentences``."""

    name = "ZSCL"
    summary = "distillation from the zero-shot model on reference images and sentences"
    flag_group = ("ZSCL reference data", "The teacher and the reference images and sentences of ZSCL.")
    requires = {"ref_wise_alpha": "ref_wise"}

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--ref-dataset", role="dataset", default="ImageNet",
                 help="Reference images: any registered dataset (ImageNet, ImageNetSubset:N, ...) or ToyCaptions.")
        add_flag(group, "--ref-sentences", role="dataset", default="conceptual_captions",
                 help="Reference sentences: conceptual_captions, random (10-token random sequences), ToyCaptions, "
                      "ref (the ref dataset's class prompts), or dataset:A,B (class prompts of named datasets).")
        add_flag(group, "--ref-model", role="model", default=None, path=True,
                 help="Teacher weights (a file or model name) instead of the zero-shot model.")
        add_flag(group, "--ref-wise", action="store_true",
                 help="Teacher = alpha * current + (1 - alpha) * zero-shot weights, rebuilt at each task start.")
        add_flag(group, "--ref-wise-alpha", type=unit_interval, default=0.8, help="alpha of --ref-wise.")

    @classmethod
    def check_config(cls, config) -> None:
        check_sentence_spec(config.ref_sentences)
        drawn = config.ref_sentences in ("random", "ToyCaptions") or (
            config.ref_sentences == "ref" and config.ref_dataset in CAPTION_DATASETS)
        default = getattr(config, "_defaults", {}).get("ref_sentences_count", config.ref_sentences_count)
        if config.ref_sentences_count != default and not drawn:
            raise UserError(f"--ref-sentences-count draws sentences for --ref-sentences random or ToyCaptions; "
                            f"--ref-sentences {config.ref_sentences} uses all its sentences: drop "
                            f"--ref-sentences-count")

    def stable_teacher(self) -> bool:
        return not self.config.ref_wise  # a WiSE blend with the current model changes at every task

    def make_teacher(self, run, task):
        cfg = self.config
        if cfg.ref_model:
            from mtil.models.clip_loading import load_clip

            return frozen_copy(load_clip(cfg.ref_model, clip_root=cfg.clip_root, device=run.device).model)
        teacher = frozen_copy(run.model)
        zeroshot = run.zeroshot_state()
        if cfg.ref_wise:  # teacher = alpha * current + (1 - alpha) * zero-shot, rebuilt at each task start
            current = {n: p.detach() for n, p in run.model.named_parameters()}
            load_into(teacher, interpolate(current, zeroshot, cfg.ref_wise_alpha))
        else:
            load_into(teacher, zeroshot)
        return teacher

    def check_inputs(self) -> None:
        cfg = self.config
        checks = []
        if cfg.ref_dataset not in CAPTION_DATASETS:
            checks.append(lambda: open_dataset(cfg.ref_dataset, cfg.data_location, cfg.download))
        if cfg.ref_sentences == "conceptual_captions":
            checks.append(lambda: conceptual_captions(cfg.data_location))
        elif cfg.ref_sentences.startswith("dataset:"):
            for name in filter(None, cfg.ref_sentences[len("dataset:"):].split(",")):
                checks.append(lambda name=name: open_dataset(name, cfg.data_location, cfg.download))
        if cfg.ref_model:
            checks.append(lambda: _require_model(cfg.ref_model))
        problems = []
        for check in checks:
            try:
                check()
            except UserError as exc:
                problems.append(str(exc))
        if problems:
            raise UserError("; ".join(problems))

    def reference_images(self, run, task):
        name = self.config.ref_dataset
        if name in CAPTION_DATASETS:
            return open_caption_dataset(name, self.config.data_location)
        return open_dataset(name, self.config.data_location, self.config.download).raw("train")

    def reference_sentences(self, run, task):
        return resolve_sentences(self.config, run, task)


SENTENCE_SPECS = ("conceptual_captions", "random", "ToyCaptions", "ref")


def _require_model(name: str) -> None:
    if not Path(name).is_file() and name not in model_names():
        raise UserError(f"--ref-model {name!r} is neither a file nor a model name ({', '.join(model_names())})")


def check_sentence_spec(spec: str) -> None:
    """``--ref-sentences`` is one of SENTENCE_SPECS or ``dataset:A[,B...]`` (at least one name)."""
    if spec in SENTENCE_SPECS or (spec.startswith("dataset:") and any(spec[len("dataset:"):].split(","))):
        return
    raise UserError(f"--ref-sentences {spec!r}: accepted: conceptual_captions, random, ToyCaptions, ref, "
                    f"dataset:NAME[,NAME]")


def resolve_sentences(config, run, task) -> list[str] | torch.Tensor:
    """``--ref-sentences``: conceptual_captions, random, ToyCaptions, ref (the ref dataset's class prompts),
    or dataset:A,B (class prompts of the named datasets)."""
    spec = config.ref_sentences
    check_sentence_spec(spec)
    if spec == "conceptual_captions":
        return conceptual_captions(config.data_location)
    if spec == "random":
        return random_token_sentences(config.ref_sentences_count, seed=config.seed)
    if spec == "ToyCaptions":
        return toy_captions(config.ref_sentences_count)
    if spec == "ref":
        if config.ref_dataset in CAPTION_DATASETS:
            return toy_captions(config.ref_sentences_count)
        return class_prompts([config.ref_dataset], config.data_location, config.download)
    if spec.startswith("dataset:"):
        return class_prompts([n for n in spec[len("dataset:"):].split(",") if n], config.data_location,
                             config.download)
    raise UserError(f"--ref-sentences {spec!r}: accepted: conceptual_captions, random, ToyCaptions, ref, "
                    f"dataset:NAME[,NAME]")


class _PreviousModelDistillation(ReferenceDistillation):
    """Teacher = the model at the end of the previous task (zero-shot for the first); reference images = the
    current task's training images."""

    def make_teacher(self, run, task):
        return frozen_copy(run.model)

    def reference_images(self, run, task):
        return task.data.raw("train")


@register
class LwF(_PreviousModelDistillation):
    """LwF: sentences = the current task's class prompts (the first template of each class, as the original ZSCL
    code; ``--lwf-sentences all-templates`` for every template)."""

    name = "lwf"
    summary = "distillation from the previous task's model on the current images, over its class prompts"
    flag_group = ("LwF", "Learning without Forgetting.")

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--lwf-sentences", default="first-template", choices=["first-template", "all-templates"],
                 help="LwF's sentences: the first template of each class of the current task (the original's) or "
                      "every template of each class.")

    def reference_sentences(self, run, task):
        templates = task.data.templates[:1] if self.config.lwf_sentences == "first-template" else task.data.templates
        return [t.format(c) for c in task.data.classnames for t in templates]


@register
class LwFVR(_PreviousModelDistillation, _DrawnSentences):
    """LwF with random-token sentences (LwF-VR)."""

    name = "lwf-vr"
    summary = "LwF with random-token sentences"

    def reference_sentences(self, run, task):
        return random_token_sentences(self.config.ref_sentences_count, seed=self.config.seed)
