"""Pre-train ``toyclip``, the built-in benchmark's tiny CLIP, and write the weights mtil ships.

Contrastive (CLIP) training of ``tiny-vit`` on the ToyWorld image-caption corpus, from random weights. The
corpus's images are rendered once into memory (a fixed pool); every step draws a batch from the pool and a fresh
caption for each image (captions name 2-5 of an image's attributes, every attribute equally often, never what
``toyworld.NEVER_CAPTIONED`` holds back), so the text side never repeats. A zero-shot table per attribute (each
ToyWorld task's test set, its own class prompts) is printed as training goes. The result is written trimmed to the words the benchmark uses
(``mtil/models/toyclip.py``) and its SHA-256 printed: put it in ``mtil/models/toyclip.py`` when replacing the
shipped file.

Deterministic: the same command on the same machine writes the same file (seeded data, captions and
initialisation; a fixed number of threads; deterministic algorithms on a GPU; the file's bytes do not depend on
its name). Another device or torch version computes in another floating-point order and writes slightly different
weights; the file records where it was made. A GPU is used when there is one. The shipped file was made by the
defaults on one NVIDIA H100 (torch 2.11): 6 minutes, the CPU side (fresh captions, tokenizing) being the limit;
two runs side by side there (7 000 steps, before the caption hold-out) wrote identical weights. On 2 CPU cores
about 30 minutes (extrapolated, not timed).

    python scripts/pretrain_toyclip.py                    # the shipped model
    python scripts/pretrain_toyclip.py --steps 200 --out /tmp/toyclip.pt     # a quick look
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mtil.datasets import toyworld  # noqa: E402
from mtil.models import toyclip  # noqa: E402
from mtil.models.architectures import TINY_ARCHITECTURES  # noqa: E402
from mtil.models.clip_loading import build_clip  # noqa: E402
from mtil.models.text import tokenize, zeroshot_head  # noqa: E402
from mtil.models.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402

ARCH = "tiny-vit"
VOCABULARY_SAMPLE = 50_000  # captions tokenized to find the words the corpus uses (more than cover every word)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> a normalised float batch, as the evaluation transform makes it."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
    return (batch - mean) / std


def benchmark_vocabulary(model, seed: int) -> list[int]:
    """Token ids of every caption word, class name and template of the benchmark (plus start/end tokens)."""
    rng = np.random.default_rng([seed, 7])
    texts = [toyworld.caption_for(toyworld.sample_scene(rng), rng) for _ in range(VOCABULARY_SAMPLE)]
    for info in toyworld.TASKS.values():
        texts += [t.format(c) for t in info.templates for c in info.classes]
    ids = set()
    for start in range(0, len(texts), 4096):
        ids.update(tokenize(model, texts[start:start + 4096]).unique().tolist())
    ids.discard(0)  # padding
    return sorted(ids)


class ZeroShotTable:
    """Zero-shot top-1 of every ToyWorld task on a fixed, pre-rendered sample of its test split."""

    def __init__(self, per_task: int, device: torch.device):
        self.sets = {}
        for name in toyworld.TASKS:
            data = toyworld.ToyTaskDataset(name, "test", size=per_task)
            images = to_tensor([data.render(i) for i in range(len(data))]).to(device)
            self.sets[name] = (images, torch.tensor(data.targets, device=device), data)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        table = {}
        for name, (images, targets, data) in self.sets.items():
            head = zeroshot_head(model, data.classes, data.templates)
            features = F.normalize(model.encode_image(images).float(), dim=-1)
            table[name] = (features @ head).argmax(1).eq(targets).float().mean().item() * 100
        model.train(was_training)
        return table


def describe_device(device: torch.device, threads: int) -> str:
    """Where the weights were computed (recorded in the file: floating-point results differ between devices)."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{threads} threads"
    return f"{device.type} ({where}, torch {torch.__version__})"


def format_table(table: dict[str, float]) -> str:
    chance = {name: 100 / len(info.classes) for name, info in toyworld.TASKS.items()}
    return "  ".join(f"{name.removeprefix('Toy')} {v:.1f} ({chance[name]:.0f})" for name, v in table.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--pool", type=int, default=60_000, help="caption-corpus images rendered once and reused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (fixed: results depend on it)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-size", type=int, default=1000, help="test images per task in the zero-shot table")
    parser.add_argument("--out", type=Path, default=toyclip.ASSET)
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "pool", "threads", "eval_every", "eval_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup}")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with this
        torch.use_deterministic_algorithms(True, warn_only=False)
    arch = TINY_ARCHITECTURES[ARCH]
    model = build_clip(arch, seed=args.seed).to(device)
    print(f"pretrain_toyclip: {ARCH} from random weights, {args.steps} steps of batch {args.batch_size} on {device} "
          f"({args.threads} threads); rendering {args.pool} caption images and the test sets ...", flush=True)
    started = time.perf_counter()
    corpus = toyworld.ToyCaptionDataset("train", size=args.pool, seed=args.seed)
    images = to_tensor([corpus.render(i) for i in range(args.pool)])
    scenes = [corpus.scene(i) for i in range(args.pool)]
    table = ZeroShotTable(args.eval_size, device)
    print(f"rendered in {time.perf_counter() - started:.0f} s; zero-shot before training: "
          f"{format_table(table(model))}", flush=True)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    caption_rng = np.random.default_rng([args.seed, 1])
    labels = torch.arange(args.batch_size, device=device)
    bar = tqdm(range(1, args.steps + 1), desc="pretrain", dynamic_ncols=True, file=sys.stdout)
    for step in bar:
        if step <= args.warmup:
            lr = args.lr * step / max(1, args.warmup)
        else:
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / (args.steps - args.warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(args.pool, (args.batch_size,), generator=generator)
        captions = [toyworld.caption_for(scenes[i], caption_rng) for i in index.tolist()]
        image_features = F.normalize(model.encode_image(images[index].to(device)), dim=-1)
        text_features = F.normalize(model.encode_text(tokenize(model, captions).to(device)), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", refresh=False)
        if step % args.eval_every == 0 or step == args.steps:
            bar.write(f"[step {step}] loss {loss.item():.3f}  zero-shot % (chance): {format_table(table(model))}")
    bar.close()

    final = table(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    vocabulary = benchmark_vocabulary(model, args.seed)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd, "seed": args.seed,
            "pool": args.pool, "zero_shot": final, "eval_size": args.eval_size, "arch_name": ARCH,
            "device": describe_device(device, args.threads)}
    digest = toyclip.write_asset(args.out, state, arch, vocabulary, meta)
    print(f"\nwrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {len(vocabulary)} token rows) in "
          f"{time.perf_counter() - started:.0f} s\nSHA-256 {digest}\nzero-shot % (chance): {format_table(final)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
