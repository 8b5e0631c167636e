"""Benchmark ``--train-mode fc`` (the linear probe): an epoch on cached image features against an epoch that
encodes its images every time (what training the head with the image encoder in the loop costs).

mtil encodes a task's training images once (``Finetune._cached_features``) and trains the head on the features;
this times one epoch of head steps on cached features against one epoch of (encode the batch without gradient,
head step), both with the real head and optimiser, on random weights and images:

    python scripts/bench_fc.py --model ViT-B/32 --images 128 --batch-size 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mtil.models.clip_loading import load_clip, resolve_device
from mtil.models.heads import LinearHead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = resolve_device(args.device)
    model = load_clip(args.model, untrained=True, device=device, seed=0).model.eval()
    resolution = model.visual.input_resolution
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, resolution, resolution, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (args.images,), generator=generator).to(device)
    width = model.visual.output_dim
    head = LinearHead(torch.randn(args.classes, width, generator=generator)).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)

    def encode(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(model.encode_image(batch).float(), dim=-1)

    def head_step(features: torch.Tensor, targets: torch.Tensor) -> None:
        loss = F.cross_entropy(head(features), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    cached = torch.cat([encode(chunk) for chunk in images.split(args.batch_size)])
    sync()
    encode_once = time.perf_counter() - start

    def epoch(uncached: bool) -> float:
        sync()
        begin = time.perf_counter()
        for index in range(0, args.images, args.batch_size):
            features = encode(images[index:index + args.batch_size]) if uncached \
                else cached[index:index + args.batch_size]
            head_step(features, labels[index:index + args.batch_size])
        sync()
        return time.perf_counter() - begin

    epoch(False), epoch(True)  # warm-up
    with_cache, without = [], []
    for _ in range(args.repeats):
        with_cache.append(epoch(False))
        without.append(epoch(True))
    cached_s, uncached_s = statistics.median(with_cache), statistics.median(without)
    print(f"model={args.model} device={device} images={args.images} batch={args.batch_size} "
          f"threads={torch.get_num_threads()}")
    print(f"encoding the {args.images} images once: {encode_once:.3f} s")
    print(f"fc epoch on cached features: {cached_s:.4f} s; encoding every batch: {uncached_s:.3f} s; "
          f"cached is x{uncached_s / cached_s:.0f} faster")


if __name__ == "__main__":
    main()
