"""A resumable stream of training batches.

The stream is a sequence of *draws*: draw ``d`` is item ``perm_e[d mod n]`` of epoch ``e = d // n``, where
``perm_e`` is a permutation seeded by (seed, task, epoch). Each draw's augmentation is seeded by (seed, task, d).
Batch ``k`` is draws ``k*B .. k*B+B-1``, so step ``k`` sees the same images with the same crops whether the run
went straight through or was resumed at step ``k`` — the basis of exact resume. With several processes rank ``r``
of ``W`` takes the draws ``d`` of each batch with ``d % W == r`` (``B/W`` of them; ``B`` a multiple of ``W``), so the
processes together see exactly the single process's batch.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _mix(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DrawSampler(Sampler):
    """Yields ``(draw, index)`` pairs for draws ``start .. stop-1`` (every ``world``-th from ``start + rank``)."""

    def __init__(self, size: int, seed: int, stream: int, start: int, stop: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.stream, self.start, self.stop = size, seed, stream, start, stop
        self.rank, self.world = rank, world

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.stream, epoch))
        return torch.randperm(self.size, generator=generator)

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.stop, self.world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, perm = None, None
        for draw in range(self.start + self.rank, self.stop, self.world):
            if draw // self.size != epoch:
                epoch = draw // self.size
                perm = self.permutation(epoch)
            yield draw, int(perm[draw % self.size])


class SeededItems(Dataset):
    """Wraps a dataset of raw items: the transform of draw ``d`` runs under a torch seed derived from ``d``."""

    def __init__(self, raw: Dataset, transform: Callable | None, seed: int, stream: int):
        self.raw, self.transform, self.seed, self.stream = raw, transform, seed, stream

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key: tuple[int, int]):
        draw, index = key
        item, target = self.raw[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, self.stream, draw, 1))
                item = self.transform(item)
        return item, target


def batch_stream(raw: Dataset, transform: Callable | None, *, batch_size: int, seed: int, stream: int,
                 start_step: int, total_steps: int, workers: int, pin_memory: bool,
                 collate_fn: Callable | None = None, rank: int = 0, world: int = 1) -> DataLoader:
    """Loader of the batches for steps ``start_step .. total_steps-1`` of one task (rank ``rank`` of ``world``
    processes: its ``batch_size // world`` draws of each global batch)."""
    sampler = DrawSampler(len(raw), seed, stream, start_step * batch_size, total_steps * batch_size, rank, world)
    # Its own generator: iter(DataLoader) draws a base seed, which must not come from the global RNG (on a resume
    # the loader starts after the RNG was restored, so randomness inside the steps, e.g. dropout, would shift).
    generator = torch.Generator().manual_seed(_mix(seed, stream, start_step, 2))
    return DataLoader(SeededItems(raw, transform, seed, stream), batch_size=batch_size // world, sampler=sampler,
                      num_workers=workers, pin_memory=pin_memory, drop_last=False, collate_fn=collate_fn,
                      persistent_workers=False, generator=generator)
