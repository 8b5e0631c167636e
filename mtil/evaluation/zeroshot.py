"""Zero-shot top-1/top-5 evaluation with template-ensemble heads computed once per model state."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from mtil.datasets.base import TaskData
from mtil.datasets.fewshot import FewShot, open_view
from mtil.errors import UserError
from mtil.evaluation.sampling import balanced_sample
from mtil.evaluation.label_space import union_datasets
from mtil.models.heads import Head, UnionHead, ZeroShotHead, joins_union
from mtil.models.text import zeroshot_head
from mtil.models.transforms import eval_transform
from mtil.models.backend import image_spec, logit_bias
from mtil.parallel import SINGLE, Parallel


@dataclass(frozen=True)
class EvalResult:
    dataset: str
    top1: float
    top5: float
    count: int
    classes: int = 0
    head: str = "zeroshot"  # the kind of head that classified (a learned head replaces zero-shot's)


def autocast_for(device: torch.device, dtype: torch.dtype | None = None):
    """Autocast to ``dtype`` (float32: none). Without a dtype: half precision on GPU (as OpenAI's fp16 weights
    were trained), exact float32 on CPU."""
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class ZeroShotEvaluator:
    """Evaluates one model on named datasets.

    Datasets, sampled subsets and loaders are built once. Heads depend only on the text encoder, so they are
    cached until :meth:`model_changed` says the weights moved (``text_changed=False`` keeps them, e.g. when only
    the image encoder trains). With a few-shot protocol (``fewshot``) a dataset can be evaluated on its ``val``
    split and on a ``part`` of its classes (``base``, ``new``: among that part's class prompts only).

    **Label spaces** (:mod:`mtil.evaluation.label_space`): :meth:`evaluate` with ``seen`` (the tasks trained so
    far) classifies among the classes of the seen tasks plus the dataset's own, with :meth:`union_head`: the heads
    of those datasets side by side (:class:`~mtil.models.heads.UnionHead`; each dataset's head from the cache or
    ``learned_heads``, so nothing is built twice and the images are encoded once, as for ``dataset``). The seam
    for methods with their own task-agnostic inference (MoE-Adapters' DDAS, DIKI's calibration, RAIL's fusion):
    ``task_agnostic_head``, when set, is asked first with (dataset, layout) and may return a head whose logits
    cover the layout's datasets' classes in that order (its ``encode`` may be its own); None lets the union of
    per-dataset heads answer. A union of one dataset (no task seen, or only the dataset itself) is the dataset's
    own head: ``seen`` then equals ``dataset`` exactly.
    """

    def __init__(self, model: nn.Module, *, data_location: str | Path = "data", download: bool = False,
                 batch_size: int = 128, workers: int = 2, max_size: int | None = None, seed: int = 0,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.data_location = data_location
        self.download = download
        self.batch_size = batch_size
        self.workers = workers
        self.max_size = max_size
        self.seed = seed
        # None: half precision on GPU, float32 on CPU (autocast_for's default); else the run's --precision
        self.autocast_dtype = autocast_dtype
        self._heads: dict[str, ZeroShotHead] = {}
        # Heads learned in training (e.g. the linear heads of image-fc / fc) replace their dataset's zero-shot head.
        self.learned_heads: dict[str, Head] = {}
        self._loaders: dict[tuple[str, str, str], DataLoader] = {}
        self.fewshot: FewShot | None = None  # the run's few-shot protocol (val split, base/new parts)
        self.heads_built = 0  # counted, so tests can prove the cache works
        self.images_encoded = 0  # images through the image encoder (a feature store's hits are not counted)
        # Bumped by every model_changed: a feature store keys features by it (and by what it reads of the model).
        self.model_version = 0
        # Optional: an object with load(model, version, descriptor) -> (features, labels) | None and
        # save(model, version, descriptor, features, labels), that keeps encoded features (Tip-Adapter's cache).
        self.feature_store = None
        # Called with (EvalResult, split, part, logits, labels) after every evaluation (classification reports).
        self.logits_listeners: list = []
        # Several processes: each encodes its run of whole batches, every rank gets all features (see encoded).
        self.parallel: Parallel = SINGLE
        # --label-space seen: (dataset, layout) -> a method's own head over the layout's classes, or None (the
        # union of per-dataset heads). Set by the sequence runner from Method.task_agnostic_head.
        self.task_agnostic_head = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_changed(self, text_changed: bool = True) -> None:
        self.model_version += 1
        if text_changed:
            self._heads.clear()

    def task(self, name: str, part: str = "all") -> TaskData:
        return open_view(name, self.data_location, self.download, self.fewshot, part)

    def _autocast(self):
        return autocast_for(self.device, self.autocast_dtype)

    def zeroshot_head(self, name: str, part: str = "all") -> ZeroShotHead:
        key = name if part == "all" else f"{name}\0{part}"
        if key not in self._heads:
            task = self.task(name, part)
            was_training = self.model.training
            self.model.eval()
            with self._autocast():
                weight = zeroshot_head(self.model, task.classnames, task.templates).float()
            self._heads[key] = ZeroShotHead(weight)
            self.model.train(was_training)
            self.heads_built += 1
        return self._heads[key]

    def head(self, name: str, part: str = "all") -> Head:
        """The head that classifies ``name``: a learned one if training left one, else the zero-shot head (of the
        ``part``'s classes; a learned head covers all of a dataset's classes)."""
        learned = self.learned_heads.get(name) if part == "all" else None
        return learned if learned is not None else self.zeroshot_head(name, part)

    def classes(self, name: str, part: str = "all") -> int:
        return len(self.task(name, part).classnames)

    def union_head(self, name: str, layout: list[str]) -> Head:
        """The head that classifies images of ``name`` among the classes of every dataset of ``layout`` (each its
        own slots, in that order; see the class docstring)."""
        if len(layout) == 1:
            return self.head(name)
        if self.task_agnostic_head is not None:
            own = self.task_agnostic_head(name, list(layout))
            if own is not None:
                expected = sum(self.classes(d) for d in layout)
                if own.num_classes != expected:
                    raise ValueError(f"the task-agnostic head for {name} gives {own.num_classes} classes, "
                                     f"the layout {layout} has {expected}")
                return own
        parts = [(d, self.head(d)) for d in layout]
        refused = [f"{d} ({head.kind})" for d, head in parts if not joins_union(head)]
        if refused:
            raise UserError(f"--label-space seen: the heads of {', '.join(refused)} cannot join one head with "
                            f"other datasets' (their own image encoding or logit scale)")
        bias = logit_bias(self.model)
        return UnionHead(parts, scale=float(self.model.logit_scale.detach().exp()),
                         bias=0.0 if bias is None else float(bias.detach().reshape(-1)[0]))

    def loader(self, name: str, split: str = "test", part: str = "all") -> DataLoader:
        key = (name, split, part)
        if key not in self._loaders:
            task = self.task(name, part)
            dataset = task.dataset(split, eval_transform(image_spec(self.model)))
            if self.max_size is not None and self.max_size < len(dataset):
                dataset = Subset(dataset, balanced_sample(task.targets(split), self.max_size, self.seed))
            if self.parallel.distributed:  # this rank's batches: exactly those one process would form
                mine = self.parallel.batch_range(-(-len(dataset) // self.batch_size))
                dataset = Subset(dataset, range(mine.start * self.batch_size,
                                                min(mine.stop * self.batch_size, len(dataset))))
            self._loaders[key] = DataLoader(
                dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=False,
                # its own generator: an evaluation pass must not draw from the global torch RNG (the loader takes
                # a worker base seed from it), or training after an evaluation would depend on how many ran
                generator=torch.Generator().manual_seed(self.seed),
            )
        return self._loaders[key]

    def encoded(self, name: str, split: str, part: str, head: Head) -> tuple[torch.Tensor, torch.Tensor]:
        """The features ``head`` classifies and the labels of every image of the split (a feature store, when
        set, answers instead of the image encoder, and keeps what was encoded)."""
        descriptor = {"dataset": name, "split": split, "part": part, "features": head.feature_id,
                      "max_size": self.max_size, "sample_seed": self.seed,
                      "fewshot": self.fewshot.describe() if self.fewshot is not None and split == "val" else None}
        if self.feature_store is not None:
            found = self.feature_store.load(self.model, self.model_version, descriptor)
            if found is not None:
                return found[0].to(self.device), found[1].to(self.device)
        was_training = self.model.training
        self.model.eval()
        features, labels = [], []
        for images, targets in self.loader(name, split, part):
            images = images.to(self.device, non_blocking=True)
            with self._autocast():
                features.append(head.encode(self.model, images).float())
            labels.append(targets.to(self.device, non_blocking=True))
        self.model.train(was_training)
        if self.parallel.distributed:  # every rank's batches, in order, on every rank
            features = self.parallel.gather_rows(torch.cat(features) if features else None, matrix=True,
                                                 device=self.device)
            labels = self.parallel.gather_rows(torch.cat(labels) if labels else None, dtype=torch.int64,
                                               device=self.device)
        else:
            features, labels = torch.cat(features), torch.cat(labels)
        self.images_encoded += labels.numel()
        if self.feature_store is not None:
            self.feature_store.save(self.model, self.model_version, descriptor, features.cpu(), labels.cpu())
        return features, labels

    @torch.no_grad()
    def evaluate(self, name: str, split: str = "test", part: str = "all",
                 seen: list[str] | tuple[str, ...] | None = None) -> EvalResult:
        """Top-1/top-5 of ``split`` (test, or a few-shot run's val) of the ``part`` (all, base, new) of ``name``.
        ``seen``: the tasks trained so far, for ``--label-space seen`` (None: among ``name``'s own classes). The
        listeners then get logits over the union's slots and labels moved to ``name``'s block."""
        layout = [name] if seen is None else union_datasets(name, seen)
        if len(layout) > 1:
            if part != "all":
                raise ValueError(f"--label-space seen ranks among all classes of each dataset, not the {part} part")
            head = self.union_head(name, layout)
            offset = sum(self.classes(d) for d in layout[:layout.index(name)])
            classes = sum(self.classes(d) for d in layout)
        else:
            head = self.head(name) if part == "all" else self.head(name, part)
            offset, classes = 0, len(self.task(name, part).classnames)
        features, labels = self.encoded(name, split, part, head)
        if offset:
            labels = labels + offset
        logits = torch.cat([head(chunk) for chunk in features.split(self.batch_size)])
        top = logits.topk(min(5, classes), dim=1).indices
        hits = top == labels[:, None]
        total = labels.numel()
        result = EvalResult(name, 100.0 * hits[:, 0].sum().item() / total, 100.0 * hits.any(dim=1).sum().item() / total,
                            total, classes, head.kind)
        for listener in self.logits_listeners:
            listener(result, split, part, logits.cpu(), labels.cpu())
        return result
