"""``--method tip-adapter``, ``tip-adapter-f`` and ``tip-x``: few-shot cache models on a frozen CLIP.

Three registered names (one class each; the latter two subclass the first, so each has only the flags it uses and
a flag of another variant is refused by the registry): ``tip-adapter`` (training-free), ``tip-adapter-f`` (the
cache keys learned) and ``tip-x`` (Tip-Adapter plus SuS-X's KL-divergence affinity). The formulas are in
:mod:`mtil.adapters.tip`, the search in :mod:`mtil.adapters.search`.

All three are ``training_free`` methods (the engine runs no step; the CLIP model stays frozen) that need
``--shots K``. In ``before_task`` of a task:

1. **cache**: every one of the K x C training images is encoded in ``--tip-augment-views`` augmented versions
   (RandomResizedCrop scale 0.5-1, bicubic, and a horizontal flip with probability 0.5, each view of each image
   under its own torch seed derived from ``--seed``, the view and the image, so the views do not depend on the
   number of loader workers); keys = the L2-normalised mean over the views of the L2-normalised features, values
   = one-hot labels;
2. **search**: α, β (Tip-X: and γ) over ``--tip-alpha-grid`` x ``--tip-beta-grid`` (x ``--tip-gamma-grid``) by
   top-1 on the validation images of the few-shot draw (never the test split);
3. **Tip-Adapter-F** only: from the training-free choice (α₀, β₀), the keys train with cross-entropy on the
   Tip-Adapter logits of the individual augmented views (the cached features: no image is encoded again) for
   ``--tip-epochs`` epochs of batches of ``--tip-batch-size`` under AdamW (``--tip-lr``, eps 1e-4) with a cosine
   schedule, shuffled by a generator seeded from ``--seed`` and the task (deterministic); the *last* epoch's keys
   are kept (the original kept the epoch best on test data); then α, β are searched again on val with them;
4. the head (:class:`~mtil.adapters.tip.TipHead`) goes into ``run.heads[task]``, so every evaluation of that
   dataset (test, val, ``--eval-only`` of the checkpoint) uses the cache logits; the choice and every grid
   point's validation scores go to ``<save>/tip_<Dataset>.json`` and one printed line.

With ``--feature-cache DIR`` the encoded features (the augmented training views, validation and test images)
are kept in DIR (:mod:`mtil.adapters.feature_cache`) and a later run with the same weights, data, draw and
augmentation reads them instead of running the image encoder.

The seam for the IMO adapter: a subclass may set ``head_class`` (a TipHead subclass whose ``encode`` returns
the original features followed by adapted ones, with its own ``feature_id``), ``affinity_split = True`` and
``encoder()`` (an object with the same ``encode`` and ``feature_id``, used before the head exists); the cache keys
and the affinity ``A`` then use the adapted features, the zero-shot term and Tip-X's distributions the original
ones.
"""
from __future__ import annotations

import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mtil.adapters.feature_cache import check_cache_dir, store_of
from mtil.adapters.search import Choice, grid_search, parse_grid
from mtil.adapters.tip import (
    TipHead,
    affinity,
    class_distribution,
    fit_keys,
    kl_and_affinity_ranges,
    one_hot_values,
    tipx_term,
    zero_shot_logits,
)
from mtil.atomic import atomic_open
from mtil.engine.data_stream import _mix
from mtil.engine.method import Method
from mtil.errors import UserError
from mtil.evaluation.metrics_io import safe_name
from mtil.adapters.tip_imo import IMOFeatures, TipIMOHead
from mtil.flags import add_flag, positive_float, positive_int
from mtil.models.heads import Head
from mtil.models.imo_adapter import check_imo_fits, read_imo_file
from mtil.models.backend import image_spec
from mtil.models.transforms import ImageSpec, as_image_spec
from mtil.registry import register

DEFAULT_ALPHAS = [0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0]  # the original's range 0.1-3, coarse
DEFAULT_BETAS = [0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0]  # the original's range 0.1-7, coarse
DEFAULT_GAMMAS = [0.0, 0.1, 0.3, 0.5, 1.0, 2.0]  # with 0: Tip-X may fall back to Tip-Adapter
AUGMENTATION = "RandomResizedCrop(scale=0.5-1,bicubic)+HorizontalFlip(0.5)"
AUGMENT_STREAM = 3_000_000  # the views' seeds never collide with a training stream's
FIT_STREAM = 3_100_000  # Tip-Adapter-F's shuffles


def _rgb(image):
    return image.convert("RGB")


def augment_transform(spec: ImageSpec | int) -> T.Compose:
    """The cache's augmentation (Tip-Adapter's): RandomResizedCrop scale 0.5-1 + horizontal flip, the model's
    normalisation."""
    spec = as_image_spec(spec)
    return T.Compose([T.RandomResizedCrop(spec.resolution, scale=(0.5, 1.0), interpolation=spec.mode),
                      T.RandomHorizontalFlip(p=0.5), _rgb, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


class AugmentedViews(Dataset):
    """Item ``k`` is view ``k // n`` of image ``k % n``, its transform run under a torch seed of (seed, view,
    image): the same pixels whatever the loader's workers or batch size."""

    def __init__(self, raw: Dataset, transform, seed: int, views: int):
        self.raw, self.transform, self.seed, self.views = raw, transform, int(seed), int(views)

    def __len__(self) -> int:
        return self.views * len(self.raw)

    def __getitem__(self, k: int):
        view, index = divmod(int(k), len(self.raw))
        image, label = self.raw[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, AUGMENT_STREAM, view, index))
            return self.transform(image), label


@register
class TipAdapter(Method):
    name = "tip-adapter"
    label = "Tip-Adapter"
    summary = ("Tip-Adapter, training-free: a cache of the K-shot training features (keys) and labels (values) "
               "beside the zero-shot head, alpha and beta chosen on val (needs --shots)")
    flag_group = ("Tip-Adapter (--method tip-adapter, tip-adapter-f, tip-x)",
                  "Few-shot cache models on a frozen CLIP (docs/methods/tip-adapter.md). logits = s f W^T + alpha "
                  "exp(-beta (1 - f Keys^T)) Values [+ gamma X]: alpha weighs the cache, beta sharpens it (the "
                  "original paper and code swapped these two names). Needs --shots K; chooses on val only.")
    training_free = True
    works_with = ()
    label_space_seen_refused = ("adds a cache term to each dataset's logits (with --imo-adapter, encodes images its "
                                "own way): its heads cannot be set beside other datasets'; use --label-space dataset")
    head_class = TipHead
    affinity_split = False  # the IMO seam: encoded features are [original | affinity] (see the module docstring)

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--tip-augment-views", type=positive_int, default=10, metavar="N",
                 help="Augmented passes over the K-shot training images (RandomResizedCrop scale 0.5-1 + "
                      "horizontal flip, seeded by --seed); the cache keys are the mean of their features.")
        add_flag(group, "--tip-alpha-grid", type=parse_grid, default=list(DEFAULT_ALPHAS), metavar="A1,A2,...",
                 help="Values of alpha (the cache term's weight) searched on val.")
        add_flag(group, "--tip-beta-grid", type=parse_grid, default=list(DEFAULT_BETAS), metavar="B1,B2,...",
                 help="Values of beta (the cache term's sharpness) searched on val.")
        add_flag(group, "--imo-adapter", default=None, metavar="FILE", path=True,
                 help="An IMO adapter file (python -m mtil.imo): the cache affinity (query and keys) uses the "
                      "adapted image features, the zero-shot term the original ones (default: none).")
        add_flag(group, "--feature-cache", role="operational", default=None, metavar="DIR", path=True,
                 help="Keep encoded image features (the cache's augmented views, val and test images) in DIR, "
                      "keyed by a hash of the image encoder's weights and what was encoded, so a later run with "
                      "the same weights and data skips the image encoder (default: off).")

    @classmethod
    def check_config(cls, config) -> None:
        if config.shots is None:
            raise UserError(f"--method {config.method} builds its cache from K training images per class and "
                            f"chooses its settings on their validation images: give --shots K")
        if config.base_new:
            raise UserError(f"--method {config.method} caches the base classes only, and --base-new evaluates "
                            f"base and new classes with zero-shot heads: drop --base-new")
        check_cache_dir(config.feature_cache)

    def check_inputs(self) -> None:
        if self.config.imo_adapter:
            self._imo_file = read_imo_file(self.config.imo_adapter)

    def check_model(self, model) -> None:
        if self.config.imo_adapter:
            tensors, _ = getattr(self, "_imo_file", None) or read_imo_file(self.config.imo_adapter)
            check_imo_fits(tensors, model, self.config.imo_adapter)

    def __init__(self, config):
        super().__init__(config)
        self.imo: IMOFeatures | None = None  # --imo-adapter: the adapter's weights, encoding [original | adapted]
        self.affinity_split = bool(config.imo_adapter)
        self.images_encoded = 0  # images this method put through the image encoder (the store's hits are not)
        self.records: dict[str, dict[str, Any]] = {}  # task -> what was chosen (the JSON's content)

    # ------------------------------------------------------------------ features
    def encoder(self) -> Head:
        """What encodes images for the cache and the search; must encode as ``head_class`` does (same
        ``feature_id``). Default: CLIP's normalised image features; with --imo-adapter, [original | adapted]."""
        return self.imo if self.imo is not None else Head()

    def split_features(self, features: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(original, affinity) features; ``width`` is the text weights' dimension."""
        if not self.affinity_split:
            return features, features
        return features[..., :width], features[..., width:]

    @torch.no_grad()
    def _train_views(self, run, task, encoder: Head) -> tuple[torch.Tensor, torch.Tensor]:
        """(V x M x D features, M labels) of the augmented views of the task's K-shot training images, from the
        feature store when it has them."""
        cfg, evaluator = self.config, run.evaluator
        protocol = evaluator.fewshot
        spec = image_spec(run.model)
        descriptor = {"dataset": task.name, "split": "train", "part": protocol.training_part,
                      "features": encoder.feature_id, "fewshot": protocol.describe(), "augment": AUGMENTATION,
                      "views": cfg.tip_augment_views, "augment_seed": cfg.seed, "resolution": spec.resolution}
        store = evaluator.feature_store
        if store is not None:
            found = store.load(run.model, evaluator.model_version, descriptor)
            if found is not None:
                return found[0].to(run.device), found[1].to(run.device)
        raw = task.data.raw("train")
        views = AugmentedViews(raw, augment_transform(spec), cfg.seed, cfg.tip_augment_views)
        loader = DataLoader(views, batch_size=cfg.batch_size_eval, shuffle=False, num_workers=cfg.workers,
                            pin_memory=run.device.type == "cuda")
        was_training = run.model.training
        run.model.eval()
        features, labels = [], []
        for images, targets in loader:
            with run.autocast():
                features.append(encoder.encode(run.model, images.to(run.device, non_blocking=True)).float())
            labels.append(targets)
        run.model.train(was_training)
        features = torch.cat(features).view(cfg.tip_augment_views, len(raw), -1)
        labels = torch.cat(labels)[:len(raw)].to(run.device)
        self.images_encoded += len(views)
        if store is not None:
            store.save(run.model, evaluator.model_version, descriptor, features.cpu(), labels.cpu())
        return features, labels

    # ------------------------------------------------------------------ the task
    def before_task(self, run, task) -> None:
        cfg, evaluator = self.config, run.evaluator
        if evaluator.feature_store is None and cfg.feature_cache:  # the runner sets it; a bare Run may not
            evaluator.feature_store = store_of(cfg, run.precision)
        started = time.perf_counter()
        if cfg.imo_adapter and self.imo is None:
            tensors, meta = getattr(self, "_imo_file", None) or read_imo_file(cfg.imo_adapter)
            self.imo = IMOFeatures(tensors, float(meta.get("scale", 0.1))).to(run.device)
        encoder = self.encoder()
        part = evaluator.fewshot.training_part
        text_weight = evaluator.zeroshot_head(task.name, part).weight.to(run.device).float()
        width, classes = text_weight.shape
        scale = float(run.model.logit_scale.exp().item())
        views, labels = self._train_views(run, task, encoder)
        original, affine = self.split_features(views, width)
        keys = F.normalize(F.normalize(affine, dim=-1).mean(dim=0), dim=-1)
        cache = {"keys": keys, "values": one_hot_values(labels, classes), "labels": labels,
                 "original_keys": F.normalize(F.normalize(original, dim=-1).mean(dim=0), dim=-1),
                 "original_views": original, "affine_views": affine}
        val_features, val_labels = evaluator.encoded(task.name, "val", part, encoder)
        val_original, val_affine = self.split_features(val_features.float(), width)
        val = {"original": val_original, "affine": val_affine, "labels": val_labels.long()}
        zero_shot = zero_shot_logits(val_original, text_weight, scale)
        record: dict[str, Any] = {
            "method": self.name, "task": task.name, "shots": cfg.shots, "fewshot_seed": cfg.fewshot_seed,
            "seed": cfg.seed, "augment_views": cfg.tip_augment_views, "augmentation": AUGMENTATION,
            "cache_images": int(labels.numel()), "classes": classes, "val_images": int(val_labels.numel()),
            "logit_scale": scale,
            "zero_shot_val_top1": 100.0 * (zero_shot.argmax(1) == val["labels"]).sum().item() / val_labels.numel(),
            "selection": "top-1 on val; ties: lower val cross-entropy, then grid order (ascending, alpha outermost)",
        }
        head, choice, table, extra = self.build_head(run, task, text_weight, scale, cache, val, zero_shot)
        if self.imo is not None:
            head = TipIMOHead(head, self.imo)
            record.update(imo_adapter=str(cfg.imo_adapter), imo_features=self.imo.feature_id)
        record.update(extra)
        record.update(chosen=choice.as_dict(), grid=self.grids(), results=[c.as_dict() for c in table],
                      images_encoded_by_method=self.images_encoded, feature_cache=cfg.feature_cache)
        run.heads[task.name] = head.to(run.device)
        self.records[task.name] = record
        self._write_record(run, task, record)
        gamma = f", gamma {choice.gamma:g}" if "gamma" in self.grids() else ""
        message = (f"[{task.name}] {self.label}: cache of {labels.numel()} images x {cfg.tip_augment_views} views; "
                   f"chosen on val ({val_labels.numel()} images, {len(table)} points): alpha {choice.alpha:g}, "
                   f"beta {choice.beta:g}{gamma} -> val {choice.top1:.2f} % (zero-shot head "
                   f"{record['zero_shot_val_top1']:.2f} %); {time.perf_counter() - started:.1f}s")
        if run.save_dir is not None:
            message += f"; {run.save_dir / self._record_name(task)}"
        print(message, flush=True)
        run.log.info(message)

    def grids(self) -> dict[str, list[float]]:
        return {"alpha": list(self.config.tip_alpha_grid), "beta": list(self.config.tip_beta_grid)}

    def build_head(self, run, task, text_weight: torch.Tensor, scale: float, cache: dict[str, torch.Tensor],
                   val: dict[str, torch.Tensor], zero_shot: torch.Tensor
                   ) -> tuple[TipHead, Choice, list[Choice], dict[str, Any]]:
        """Search on val and build the head (Tip-Adapter: keys as cached)."""
        choice, table = self._search(cache["keys"], cache["values"], val, zero_shot)
        head = self.head_class(text_weight, cache["keys"], cache["values"], scale, choice.alpha, choice.beta,
                               affinity_split=self.affinity_split)
        return head, choice, table, {}

    def _search(self, keys, values, val, zero_shot, gammas=(0.0,), extra=None) -> tuple[Choice, list[Choice]]:
        cfg = self.config
        return grid_search(zero_shot, affinity(val["affine"], keys), values, val["labels"], cfg.tip_alpha_grid,
                           cfg.tip_beta_grid, gammas, extra, split="val")

    # ------------------------------------------------------------------ files
    def _record_name(self, task) -> str:
        return f"tip_{safe_name(task.name)}.json"

    def _write_record(self, run, task, record: dict[str, Any]) -> None:
        if run.save_dir is None:
            return
        with atomic_open(run.save_dir / self._record_name(task), "w") as handle:
            json.dump(record, handle, indent=1)
            handle.write("\n")

    def state_dict(self) -> dict[str, Any]:
        return {}  # the head (in the checkpoint's heads) is all a resume needs; a task is rebuilt deterministically


@register
class TipAdapterF(TipAdapter):
    name = "tip-adapter-f"
    label = "Tip-Adapter-F"
    summary = ("Tip-Adapter-F: the cache keys trained with cross-entropy on the cached augmented features (CLIP "
               "frozen, last epoch kept), alpha and beta chosen on val (needs --shots)")
    flag_group = ("Tip-Adapter-F (--method tip-adapter-f)",
                  "Training of the cache keys, inside the task's preparation (the engine trains no step).")

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--tip-epochs", type=positive_int, default=20,
                 help="Epochs over the cached augmented training features (the last epoch's keys are kept).")
        add_flag(group, "--tip-lr", type=positive_float, default=1e-3,
                 help="AdamW learning rate of the keys (eps 1e-4, cosine schedule to 0).")
        add_flag(group, "--tip-batch-size", type=positive_int, default=256,
                 help="Augmented features per step of the keys' training.")

    def build_head(self, run, task, text_weight, scale, cache, val, zero_shot):
        cfg = self.config
        free, free_table = self._search(cache["keys"], cache["values"], val, zero_shot)
        views = cache["original_views"].shape[0]
        samples_original = cache["original_views"].reshape(-1, cache["original_views"].shape[-1])
        samples_affine = F.normalize(cache["affine_views"].reshape(-1, cache["affine_views"].shape[-1]), dim=-1)
        samples_labels = cache["labels"].repeat(views)

        def on_epoch(keys: torch.Tensor) -> dict[str, float]:  # recorded, never used to choose
            logits = zero_shot + free.alpha * torch.exp(-free.beta * (1 - affinity(val["affine"], keys))) \
                @ cache["values"]
            return {"val_top1": 100.0 * (logits.argmax(1) == val["labels"]).sum().item() / val["labels"].numel()}

        with torch.enable_grad():
            keys, history = fit_keys(
                cache["keys"], F.normalize(samples_original, dim=-1), samples_affine, samples_labels,
                cache["values"], text_weight, scale, free.alpha, free.beta, epochs=cfg.tip_epochs, lr=cfg.tip_lr,
                batch_size=cfg.tip_batch_size, generator_seed=_mix(cfg.seed, FIT_STREAM, run.state.task_index),
                on_epoch=on_epoch)
        choice, table = self._search(keys, cache["values"], val, zero_shot)
        head = self.head_class(text_weight, keys, cache["values"], scale, choice.alpha, choice.beta,
                               affinity_split=self.affinity_split)
        extra = {"training": {"epochs": cfg.tip_epochs, "lr": cfg.tip_lr, "batch_size": cfg.tip_batch_size,
                              "optimizer": "AdamW(eps=1e-4, weight_decay=0.01), cosine to 0",
                              "samples": int(samples_labels.numel()), "kept": "last epoch",
                              "alpha": free.alpha, "beta": free.beta, "history": history},
                 "training_free_choice": free.as_dict(), "training_free_results": [c.as_dict() for c in free_table]}
        return head, choice, table, extra


@register
class TipX(TipAdapter):
    name = "tip-x"
    label = "Tip-X"
    summary = ("Tip-X: Tip-Adapter plus gamma times an affinity from the KL divergences between the zero-shot "
               "class distributions of the query and of the cache images; alpha, beta, gamma chosen on val")
    flag_group = ("Tip-X (--method tip-x)",
                  "The KL-divergence affinity term (temperature 0.5; scaled onto the range of the cache "
                  "affinities measured on val; docs/methods/tip-adapter.md).")

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--tip-gamma-grid", type=parse_grid, default=list(DEFAULT_GAMMAS), metavar="G1,G2,...",
                 help="Values of gamma (the KL affinity term's weight) searched on val, with alpha and beta.")

    def grids(self) -> dict[str, list[float]]:
        return {**super().grids(), "gamma": list(self.config.tip_gamma_grid)}

    def build_head(self, run, task, text_weight, scale, cache, val, zero_shot):
        distribution = class_distribution(cache["original_keys"], text_weight)
        kl_range, affinity_range = kl_and_affinity_ranges(val["original"], val["affine"], cache["keys"],
                                                          text_weight, distribution)
        extra_val = tipx_term(val["original"], text_weight, distribution, cache["values"], kl_range, affinity_range)
        choice, table = self._search(cache["keys"], cache["values"], val, zero_shot, self.config.tip_gamma_grid,
                                     extra_val)
        head = self.head_class(text_weight, cache["keys"], cache["values"], scale, choice.alpha, choice.beta,
                               choice.gamma, distribution, kl_range, affinity_range,
                               affinity_split=self.affinity_split)
        return head, choice, table, {"kl_range": kl_range.tolist(), "affinity_range": affinity_range.tolist()}
