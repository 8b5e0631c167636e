"""Training the IMO adapter on a generic image set, CLIP frozen: supervised (a linear head on the set's labels) or
self-supervised (DINO self-distillation with an EMA teacher). ``python -m mtil.imo`` is its command line.

Only the adapters (:mod:`mtil.models.imo_adapter`) and the training head learn; every CLIP weight stays frozen.

**Supervised** (``--mode supervised``; the paper: AdamW, lr 8e-3, batch 128, scale 0.03): logits are a linear
layer on the L2-normalised image features (:class:`SupervisedHead`: unit class rows, CLIP's logit scale, started
at CLIP's zero-shot classifier of the class names), the loss is the cross-entropy with the set's labels.

**DINO** (``--mode dino``; scale 0.1): the student is the CLIP with its adapters plus a DINO projection head; the
teacher is the same frozen CLIP run with its own copy of the adapters (an exponential moving average of the
student's: ``teacher <- m * teacher + (1 - m) * student`` after every step, ``m`` following a cosine from
``--momentum-teacher`` to 1) and of the head. Each image gives 2 global crops (scale 0.4-1) and ``--local-crops``
local ones (scale 0.05-0.4); the teacher sees the global crops, the student all of them, and the loss is the
cross-entropy between the teacher's distribution of one global crop and the student's of every *other* crop,
averaged over those pairs. Teacher outputs are centred (``softmax((t - c) / T_t)``, the centre ``c`` an EMA with
momentum 0.9 of the batch mean of the teacher outputs, over all processes) and sharpened (``T_t`` rises linearly
from ``--warmup-teacher-temp`` to ``--teacher-temp`` over ``--warmup-teacher-epochs`` epochs, one value per epoch;
student temperature 0.1). Gradients are clipped to norm 3; biases get no weight decay (both DINO's).

CLIP's position embeddings are fixed at its input resolution, so local crops are resized to it (DINO's 96-pixel
local crops would need CLIP's frozen embeddings interpolated): a local crop costs as much as a global one.

**Several processes.** Under ``torchrun`` or ``srun`` (:mod:`mtil.distributed`) the student is wrapped in
DistributedDataParallel (gloo on CPU, NCCL on GPU); each process reads its own shard of every epoch
(``DistributedSampler`` seeded with ``--seed``; ``--batch-size`` is per process), the centre is averaged over all
processes, and the EMA runs on identical students, so every process ends with the same adapters. Only rank 0
writes files.

**Files** (in ``--save``; rank 0, each rewritten atomically after every epoch, so an interrupted run leaves the last
finished epoch's): ``imo_adapter.pt`` (:func:`mtil.models.imo_adapter.save_imo_adapters`: the adapters, for DINO
the teacher's (DINO's evaluated network), with ``meta``: width, scale, layers, mode, model, data, epochs_done and
every setting) and ``imo_log.csv`` (one row per epoch: mean loss over all processes, lr at the epoch's end,
seconds; for DINO also the teacher temperature and momentum).
"""
from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter, ImageOps
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from mtil.atomic import atomic_open
from mtil.distributed import DistributedEnv, cleanup_distributed, init_distributed
from mtil.errors import UserError
from mtil.hardware import set_threads
from mtil.models.imo_adapter import (add_imo_adapters, encode_image_with, imo_adapters, imo_state,
                                     save_imo_adapters)
from mtil.models.backend import image_spec
from mtil.models.transforms import ImageSpec, train_transform
from mtil.seeding import seed_everything

MODES = ("supervised", "dino")
ADAPTER_FILE = "imo_adapter.pt"
LOG_FILE = "imo_log.csv"

# Per-mode defaults of the flags that default to None (the paper's supervised recipe; DINO's and the seed's
# command for the self-supervised one: lr 8e-4 x its total batch 120 / 256 (DINO's scaling rule) = 3.75e-4 peak,
# 40 images per process, weight decay DINO's starting 0.04).
MODE_DEFAULTS: dict[str, dict[str, float]] = {
    "supervised": {"lr": 8e-3, "batch_size": 128, "scale": 0.03, "wd": 0.01},
    "dino": {"lr": 3.75e-4, "batch_size": 40, "scale": 0.1, "wd": 0.04},
}
DINO_DEFAULTS: dict[str, Any] = {"local_crops": 8, "momentum_teacher": 0.996, "teacher_temp": 0.07,
                                 "warmup_teacher_temp": 0.04, "warmup_teacher_epochs": 3, "dino_out_dim": 65536}
STUDENT_TEMP = 0.1
CENTER_MOMENTUM = 0.9
CLIP_GRAD = 3.0
HEAD_HIDDEN = 2048
HEAD_BOTTLENECK = 256
GLOBAL_SCALE = (0.4, 1.0)
LOCAL_SCALE = (0.05, 0.4)


@dataclass
class ImoSettings:
    """Every setting of an IMO training run (the flags of ``python -m mtil.imo``, defaults resolved)."""

    data: str
    save: str
    mode: str = "supervised"
    model: str = "ViT-B/16"
    clip_root: str = "clip"
    data_location: str = "data"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 8e-3
    wd: float = 0.01
    warmup_epochs: float = 0.0
    scale: float = 0.03
    width: int = 64
    dropout: float = 0.1
    local_crops: int = 8
    momentum_teacher: float = 0.996
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_epochs: int = 3
    dino_out_dim: int = 65536
    device: str = "auto"
    workers: int = 2
    threads: int | None = None
    seed: int = 0
    log_every: int = 50


def resolve_settings(values: dict[str, Any]) -> ImoSettings:
    """Fill the per-mode defaults of the values left ``None`` and check the combinations; a one-line UserError
    for a DINO flag given with ``--mode supervised`` or a warm-up as long as the run."""
    values = dict(values)
    mode = values.get("mode") or "supervised"
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: accepted: {', '.join(MODES)}")
    if mode == "supervised":
        typed = [k for k in DINO_DEFAULTS if values.get(k) is not None]
        if typed:
            flags = ", ".join("--" + k.replace("_", "-") for k in typed)
            raise UserError(f"{flags} belong(s) to --mode dino, but this run is --mode supervised: drop "
                            f"{'them' if len(typed) > 1 else 'it'} or use --mode dino")
    for key, default in {**MODE_DEFAULTS[mode], **DINO_DEFAULTS}.items():
        if values.get(key) is None:
            values[key] = default
    epochs = values.get("epochs") or ImoSettings.epochs
    if values.get("warmup_epochs") is None:  # DINO: the seed's 2 of 10 epochs; supervised: none
        values["warmup_epochs"] = min(2.0, 0.2 * epochs) if mode == "dino" else 0.0
    elif values["warmup_epochs"] >= epochs:
        raise UserError(f"--warmup-epochs {values['warmup_epochs']:g} must be less than --epochs {epochs} (the lr "
                        f"rises linearly over the warm-up, then follows a cosine to 0)")
    known = {f for f in ImoSettings.__dataclass_fields__}
    return ImoSettings(**{k: v for k, v in values.items() if k in known and v is not None})


# ---------------------------------------------------------------------------------------------- schedules
def learning_rate(step: int, total: int, peak: float, warmup_steps: int) -> float:
    """lr of optimiser step ``step`` (0-based) of ``total``: linear warm-up to ``peak`` over ``warmup_steps``
    (step ``s`` < warm-up gets ``peak (s + 1) / warmup``), then a cosine from ``peak`` towards 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def teacher_momentum(step: int, total: int, base: float) -> float:
    """EMA momentum after step ``step`` of ``total``: a cosine from ``base`` (step 0) up to 1 (DINO's)."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def teacher_temperature(epoch: int, start: float, end: float, warmup_epochs: int) -> float:
    """Teacher temperature of epoch ``epoch`` (0-based): ``start`` .. ``end`` evenly over the first
    ``warmup_epochs`` epochs (DINO's ``linspace``), then ``end``."""
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)


# ---------------------------------------------------------------------------------------------- DINO pieces
class DinoHead(nn.Module):
    """DINO's projection head: a 3-layer MLP (GELU) to a 256-d bottleneck, L2-normalised, then a weight-normalised
    linear layer without bias whose rows have norm 1 (DINO's ``norm_last_layer``) to ``out_dim`` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = HEAD_HIDDEN, bottleneck: int = HEAD_BOTTLENECK):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(features), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).T


@torch.no_grad()
def ema_update(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """``t <- m t + (1 - m) s`` for each pair of tensors, in place."""
    for t, s in zip(teacher, student, strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float,
              student_temp: float = STUDENT_TEMP, global_crops: int = 2) -> torch.Tensor:
    """DINO's loss. ``student_out``: all crops' outputs stacked crop by crop (``crops * B`` rows, the global crops
    first); ``teacher_out``: the global crops' (``global_crops * B`` rows). Mean over the pairs (teacher crop i,
    student crop v != i) of the batch mean of ``-sum softmax((t_i - center) / T_t) * log_softmax(s_v / T_s)``."""
    batch = teacher_out.shape[0] // global_crops
    crops = student_out.shape[0] // batch
    student = F.log_softmax(student_out / student_temp, dim=-1).chunk(crops)
    teacher = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(global_crops)
    total, pairs = student_out.new_zeros(()), 0
    for i, target in enumerate(teacher):
        for v, log_probs in enumerate(student):
            if v != i:
                total = total + (-target * log_probs).sum(dim=-1).mean()
                pairs += 1
    return total / pairs


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = CENTER_MOMENTUM
                   ) -> torch.Tensor:
    """``m c + (1 - m) mean(teacher_out)``, the mean taken over the rows of every process."""
    total = teacher_out.sum(dim=0, keepdim=True)
    count = torch.tensor(float(teacher_out.shape[0]), device=teacher_out.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return center * momentum + (total / count) * (1 - momentum)


class _Blur:
    """PIL Gaussian blur with a radius drawn from U(0.1, 2) with probability ``p`` (torch's RNG, so DataLoader
    workers are seeded)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        if torch.rand(()) >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=0.1 + 1.9 * float(torch.rand(()))))


class _Solarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        return ImageOps.solarize(image) if torch.rand(()) < self.p else image


def _rgb(image):
    return image.convert("RGB")


class MultiCrop:
    """DINO's augmentation: a PIL image -> [global 1, global 2, local 1 .. local N] tensors at CLIP's resolution."""

    def __init__(self, spec: ImageSpec, local_crops: int):
        jitter = [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  T.RandomGrayscale(p=0.2)]
        finish = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]

        def crop(scale):
            return [_rgb, T.RandomResizedCrop(spec.resolution, scale=scale, interpolation=spec.mode)]

        self.global_1 = T.Compose(crop(GLOBAL_SCALE) + jitter + [_Blur(1.0)] + finish)
        self.global_2 = T.Compose(crop(GLOBAL_SCALE) + jitter + [_Blur(0.1), _Solarize(0.2)] + finish)
        self.local = T.Compose(crop(LOCAL_SCALE) + jitter + [_Blur(0.5)] + finish)
        self.local_crops = local_crops

    def __call__(self, image) -> list[torch.Tensor]:
        return [self.global_1(image), self.global_2(image)] + [self.local(image) for _ in range(self.local_crops)]


# ---------------------------------------------------------------------------------------------- the trainee
class SupervisedHead(nn.Module):
    """Linear classifier on L2-normalised image features with L2-normalised class rows, times CLIP's own logit
    scale (fixed), its rows starting at CLIP's zero-shot text classifier of the class names: the form and the
    starting point of CLIP's own classifier. (A plain linear layer on unit features starts with logits near 0 and,
    at the paper's lr, barely moved in 62 steps on ToyShape: loss 2.10 -> 2.07, chance 2.08; randomly initialised
    rows start far above chance, 3.5.)"""

    def __init__(self, weight: torch.Tensor, logit_scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())  # C x D
        self.logit_scale = float(logit_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T


class Trainee(nn.Module):
    """CLIP's image encoder (with adapters) and a head: what DistributedDataParallel wraps."""

    def __init__(self, visual: nn.Module, head: nn.Module):
        super().__init__()
        self.visual = visual
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images.type(self.visual.conv1.weight.dtype)))


def trainable_parameters(trainee: Trainee) -> list[nn.Parameter]:
    return [p for p in trainee.parameters() if p.requires_grad]


def parameter_groups(trainee: Trainee, wd: float) -> list[dict]:
    """Weight decay on matrices only (DINO's rule: not on biases)."""
    params = trainable_parameters(trainee)
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- preparation
@dataclass
class Prepared:
    """Everything checked before anything is written: the data, the model (adapters added, CLIP frozen)."""

    settings: ImoSettings
    env: DistributedEnv
    clip: nn.Module
    train_set: Dataset
    classnames: list[str]
    templates: list[str]
    model_source: str


def shard_sampler(dataset: Dataset, env: DistributedEnv, seed: int) -> DistributedSampler:
    """This process's shard of every epoch: a seeded shuffle split into ``world_size`` disjoint parts (the tail
    that does not divide evenly is dropped)."""
    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                              drop_last=True)


def prepare(settings: ImoSettings, env: DistributedEnv) -> Prepared:
    """Check the save folder, read the data and build the model; one-line UserErrors, nothing written."""
    from mtil.datasets.registry import check_readable
    from mtil.models.clip_loading import load_clip

    save = Path(settings.save)
    if save.exists() and not save.is_dir():
        raise UserError(f"--save {save} is a file, not a folder")
    if (save / ADAPTER_FILE).exists():
        raise UserError(f"--save {save} already holds {ADAPTER_FILE} (an earlier IMO run): choose another --save, "
                        f"or delete that file to train again")
    seed_everything(settings.seed)  # a random-weight model and the adapters' ``down`` initialisation
    data = check_readable(settings.data, settings.data_location, splits=("train",))
    classes = len(data.classnames)
    if settings.mode == "supervised" and classes < 2:
        raise UserError(f"--mode supervised needs at least 2 classes; {settings.data} has {classes}")
    loaded = load_clip(settings.model, clip_root=settings.clip_root, device="cpu", seed=settings.seed)
    clip = loaded.model
    add_imo_adapters(clip, width=settings.width, scale=settings.scale, dropout=settings.dropout)  # refuses a ResNet
    spec = image_spec(clip)
    augment = train_transform(spec) if settings.mode == "supervised" else MultiCrop(spec, settings.local_crops)
    train_set = data.dataset("train", augment)
    per_process = len(train_set) // env.world_size
    if per_process < settings.batch_size:
        raise UserError(f"--batch-size {settings.batch_size} is more than the {per_process} training images each of "
                        f"the {env.world_size} process(es) gets from {settings.data} ({len(train_set)} in all): "
                        f"lower --batch-size")
    clip.requires_grad_(False)
    for parameter in imo_adapters(clip).parameters():
        parameter.requires_grad_(True)
    return Prepared(settings, env, clip, train_set, list(data.classnames), list(data.templates), loaded.source)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class ImoResult:
    """What a run produced: per-epoch log rows and the final adapter weights (the student's and the saved ones)."""

    log: list[dict[str, Any]]
    student: dict[str, torch.Tensor]
    saved: dict[str, torch.Tensor]
    path: Path | None
    extra: dict[str, Any] = field(default_factory=dict)


def _mean_over_processes(value: torch.Tensor) -> float:
    value = value.detach().double().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def train(prepared: Prepared) -> ImoResult:
    """Train the adapters (see the module docstring). The process group must already be joined when
    ``prepared.env`` has several processes."""
    s, env = prepared.settings, prepared.env
    device = env.device
    clip = prepared.clip.to(device)
    visual = clip.visual
    seed_everything(s.seed)  # the heads: the same on every process (DDP broadcasts rank 0's anyway)
    if s.mode == "supervised":
        from mtil.models.text import zeroshot_head

        with torch.no_grad():
            text = zeroshot_head(clip, prepared.classnames, prepared.templates).T  # C x D, unit rows
        head: nn.Module = SupervisedHead(text, float(clip.logit_scale.exp()))
    else:
        head = DinoHead(visual.output_dim, s.dino_out_dim)
    trainee = Trainee(visual, head.to(device))
    model: nn.Module = trainee
    if env.distributed:
        model = DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    teacher_adapters = teacher_head = center = None
    if s.mode == "dino":  # copies of the (broadcast) student: identical on every process
        teacher_adapters = copy.deepcopy(imo_adapters(clip)).requires_grad_(False)
        teacher_head = copy.deepcopy(trainee.head).requires_grad_(False).eval()
        center = torch.zeros(1, s.dino_out_dim, device=device)
    optimizer = torch.optim.AdamW(parameter_groups(trainee, s.wd), lr=s.lr)

    torch.manual_seed(s.seed + env.rank)  # augmentations: each process its own stream
    sampler = shard_sampler(prepared.train_set, env, s.seed)
    loader = DataLoader(prepared.train_set, batch_size=s.batch_size, sampler=sampler, num_workers=s.workers,
                        drop_last=True, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(s.seed + env.rank))
    steps_per_epoch = len(loader)
    total = steps_per_epoch * s.epochs
    warmup = round(s.warmup_epochs * steps_per_epoch)
    save_dir = Path(s.save)
    main = env.is_main
    log: list[dict[str, Any]] = []
    step = 0
    saved: dict[str, torch.Tensor] = {}
    path = None
    if main:
        print(f"mtil.imo: {s.mode} IMO adapter (width {s.width}, scale {s.scale:g}) on {prepared.model_source}; "
              f"{len(prepared.train_set)} images of {s.data}, {env.world_size} process(es) on {device}, "
              f"{steps_per_epoch} steps per epoch x {s.epochs} epochs", flush=True)
    for epoch in range(s.epochs):
        sampler.set_epoch(epoch)
        started = time.time()
        temperature = teacher_temperature(epoch, s.warmup_teacher_temp, s.teacher_temp, s.warmup_teacher_epochs)
        loss_sum, momentum, lr = 0.0, float("nan"), float("nan")
        for images, labels in loader:
            lr = learning_rate(step, total, s.lr, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            trainee.train()
            if s.mode == "supervised":
                loss = F.cross_entropy(model(images.to(device, non_blocking=True)), labels.to(device))
            else:
                crops = [c.to(device, non_blocking=True) for c in images]
                with torch.no_grad():
                    visual.eval()  # the teacher runs without dropout
                    teacher_out = teacher_head(encode_image_with(visual, teacher_adapters, torch.cat(crops[:2])))
                    visual.train()
                student_out = model(torch.cat(crops))
                loss = dino_loss(student_out, teacher_out, center, temperature)
                center = updated_center(center, teacher_out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.mode == "dino":
                torch.nn.utils.clip_grad_norm_(trainable_parameters(trainee), CLIP_GRAD)
            optimizer.step()
            if s.mode == "dino":
                momentum = teacher_momentum(step, total, s.momentum_teacher)
                ema_update([*teacher_adapters.parameters(), *teacher_head.parameters()],
                           [*imo_adapters(clip).parameters(), *trainee.head.parameters()], momentum)
            value = _mean_over_processes(loss)
            if not math.isfinite(value):
                raise UserError(f"the loss became {value} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); the "
                                f"files of the finished epochs are kept: lower --lr")
            loss_sum += value
            step += 1
            if main and s.log_every and step % s.log_every == 0:
                print(f"mtil.imo: step {step}/{total} loss {value:.4f} lr {lr:.3g}", flush=True)
        row = {"epoch": epoch + 1, "steps": step, "loss": loss_sum / steps_per_epoch, "lr": lr,
               "seconds": round(time.time() - started, 3)}
        if s.mode == "dino":
            row.update(teacher_temp=temperature, momentum=momentum)
        log.append(row)
        keep = teacher_adapters if s.mode == "dino" else None
        if main:
            meta = {"mode": s.mode, "model": s.model, "data": s.data, "epochs_done": epoch + 1,
                    "adapter": "teacher (EMA)" if keep is not None else "student", "world_size": env.world_size,
                    "settings": asdict(s)}
            path = save_imo_adapters(clip, save_dir / ADAPTER_FILE, meta, adapters=keep)
            _write_log(save_dir / LOG_FILE, log)
            print(f"mtil.imo: epoch {epoch + 1}/{s.epochs} loss {row['loss']:.4f} ({row['seconds']:.1f} s)",
                  flush=True)
    student = imo_state(clip)
    saved = student if teacher_adapters is None else \
        {k: v.detach().cpu().clone() for k, v in teacher_adapters.state_dict().items()}
    return ImoResult(log, student, saved, path, {"center": center.cpu() if center is not None else None})


def run(settings: ImoSettings, env: DistributedEnv) -> ImoResult:
    """Check, join the process group, train, leave it. Every check runs on every process before any joins."""
    set_threads(settings.threads)
    prepared = prepare(settings, env)
    init_distributed(env)
    try:
        result = train(prepared)
        if env.distributed:
            dist.barrier()
        return result
    finally:
        cleanup_distributed()


def describe(result: ImoResult) -> str:
    first, last = result.log[0], result.log[-1]
    losses = f"loss {first['loss']:.4f} (epoch 1) -> {last['loss']:.4f} (epoch {last['epoch']})" \
        if len(result.log) > 1 else f"loss {last['loss']:.4f}"
    return f"mtil.imo: done: {losses}; adapter in {result.path}"


__all__ = ["ImoSettings", "ImoResult", "resolve_settings", "prepare", "train", "run", "learning_rate",
           "teacher_momentum", "teacher_temperature", "dino_loss", "updated_center", "ema_update", "DinoHead",
           "MultiCrop", "shard_sampler"]
