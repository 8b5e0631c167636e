"""Benchmark evaluation: images per second through the image encoder, the time to build a zero-shot head, and
mtil's whole evaluation of a dataset (loading, transforms, head, top-1/top-5) against the bare encoder forward of
the same number of images (``--evaluator N``: N test images of a ToyWorld task, read and transformed as any dataset).

Random weights are fine (speed does not depend on the values):

    python scripts/bench_eval.py --model ViT-B/32 --batch-size 64 --device auto --classes 100 --templates 18
    python scripts/bench_eval.py --model ViT-B/32 --batch-size 16 --evaluator 256 --workers 0

Prints one line per measurement; timings are medians of --repeats runs after a warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtil.evaluation.zeroshot import autocast_for
from mtil.models.clip_loading import load_clip, resolve_device
from mtil.models.text import zeroshot_head


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classes", type=int, default=100, help="classes of the head to build")
    parser.add_argument("--templates", type=int, default=18, help="templates per class")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--evaluator", type=int, default=0, metavar="N",
                        help="also time the evaluator on N test images of ToyColorA against the bare encoder")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers of the evaluator")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model = load_clip(args.model, untrained=True, device=device, seed=0).model.eval()
    resolution = model.visual.input_resolution
    images = torch.randn(args.batch_size, 3, resolution, resolution, device=device)

    @torch.no_grad()
    def encode():
        with autocast_for(device):
            model.encode_image(images)

    seconds = _median_seconds(encode, device, args.repeats)
    print(f"model={args.model} device={device} batch={args.batch_size} resolution={resolution}")
    print(f"image encoding: {args.batch_size / seconds:.1f} images/s ({1000 * seconds:.1f} ms per batch)")

    classnames = [f"class {i}" for i in range(args.classes)]
    templates = [f"a photo number {j} of a {{}}." for j in range(args.templates)]

    def head():
        with autocast_for(device):
            zeroshot_head(model, classnames, templates)

    seconds = _median_seconds(head, device, max(1, args.repeats // 2))
    print(f"zero-shot head ({args.classes} classes x {args.templates} templates): {seconds:.3f} s")
    if args.evaluator:
        _evaluator_against_encoder(model, device, args)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


def _evaluator_against_encoder(model, device: torch.device, args) -> None:
    """The evaluator's pass over N images (its head already built, as after the first evaluation) against the
    encoder alone on N in-memory images in batches of the same size, timed alternately."""
    from mtil.evaluation.zeroshot import ZeroShotEvaluator

    evaluator = ZeroShotEvaluator(model, batch_size=args.batch_size, workers=args.workers,
                                  max_size=args.evaluator, seed=0)
    evaluator.evaluate("ToyColorA")  # builds the head, the dataset and the loader once, as a run does
    resolution = model.visual.input_resolution
    images = torch.randn(args.evaluator, 3, resolution, resolution, device=device)

    @torch.no_grad()
    def bare():
        for chunk in images.split(args.batch_size):
            with autocast_for(device):
                model.encode_image(chunk)

    whole, alone = [], []
    for _ in range(args.repeats):
        whole.append(_median_seconds(lambda: evaluator.evaluate("ToyColorA"), device, 1))
        alone.append(_median_seconds(bare, device, 1))
    whole_s, alone_s = statistics.median(whole), statistics.median(alone)
    print(f"evaluation of {args.evaluator} images (workers {args.workers}): {args.evaluator / whole_s:.1f} images/s; "
          f"bare encoder: {args.evaluator / alone_s:.1f} images/s; evaluation takes x{whole_s / alone_s:.3f} the "
          f"encoder's time")


if __name__ == "__main__":
    main()
