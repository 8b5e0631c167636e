"""Data-parallel training and evaluation: what each process does differently from a single one.

Beside :mod:`mtil.distributed` (which reads the launcher's environment and joins the process group), this is the
other half of running as several processes: a leaf module, so that evaluation and the engine both use it.

One :class:`Parallel` per run says this process's rank among ``world_size`` processes (``SINGLE`` when there is one:
then every helper is a no-op and no collective is ever called, so a one-process run is what it always was).

* **Batches.** Step ``k`` of the seeded stream is draws ``k*B .. k*B+B-1`` (:mod:`mtil.engine.data_stream`); rank
  ``r`` takes the draws ``d`` of that range with ``d % world_size == r``: ``B / world_size`` of them, so the global
  batch is exactly one process's batch (same images, same crops) and exact resume still holds.
* **Gradients.** The trained parameters (those the optimiser holds) are wrapped in DistributedDataParallel, which
  averages their gradients during ``backward``. Each rank's loss is the mean over its equal share, so the average
  is the gradient of the global batch mean. Frozen teachers and the zero-shot weights are never wrapped.
* **Stopping.** A stop request (SIGTERM / SIGUSR1) on any rank is voted on at every step boundary
  (:meth:`Parallel.any`), so every rank stops after the same step.
* **Whole-batch terms.** A loss that compares every item of a batch with every other (ZSCL's text-direction
  distillation: a softmax over the reference images) needs the whole global batch: :meth:`Parallel.whole_batch`
  gathers every rank's rows in the single process's order, this rank's own rows keeping their gradient, and
  :meth:`Parallel.whole_batch_term` scales the gradient of a term computed on them by the world size (its value
  unchanged): DDP's average of the ranks' gradients, each through its own rows only, is then the term's gradient.
  No collective runs inside ``backward`` besides DDP's own.
* **Shared decisions.** State every rank must hold identically (iCaRL's exemplars, OGD's basis, CLIP-AST's
  selection) is computed from identical inputs on every rank and rank 0's result is broadcast
  (:meth:`Parallel.broadcast`), so a last-bit difference between ranks can never split them.
* **Evaluation.** Each rank encodes a contiguous run of whole evaluation batches (the batches one process would
  form, so the features are bit-identical); :meth:`Parallel.gather_rows` puts them back in order on every rank.
* **Files.** Only rank 0 writes; the others wait at :meth:`Parallel.barrier` where it does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from mtil.errors import UserError


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job (rank 0 of 1 for a single process)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank is here (e.g. until rank 0 has finished writing)."""
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on at least one (a collective: every rank must call it)."""
        if not self.distributed:
            return flag
        vote = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item())

    def share(self, batch_size: int) -> int:
        """This rank's part of a global batch (the batch size was checked to divide, see :func:`check_batch_sizes`)."""
        return batch_size // self.world_size

    def batch_range(self, batches: int) -> range:
        """The contiguous run of ``batches`` (evaluation batches) this rank encodes."""
        return range(self.rank * batches // self.world_size, (self.rank + 1) * batches // self.world_size)

    def gather_rows(self, rows: torch.Tensor | None, matrix: bool = False, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None) -> torch.Tensor:
        """Every rank's ``rows`` (``matrix``: 2-D, else 1-D, e.g. labels) concatenated in rank order, on every
        rank. A rank with nothing passes None (its width then comes from the others)."""
        if not self.distributed:
            return rows
        here = torch.tensor([0 if rows is None else rows.shape[0], 0 if rows is None or rows.dim() == 1
                             else rows.shape[1]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(here) for _ in range(self.world_size)]
        dist.all_gather(sizes, here)
        counts = [int(s[0]) for s in sizes]
        width = max(int(s[1]) for s in sizes) if matrix else 0
        shape = (max(counts),) + ((width,) if width else ())
        padded = torch.zeros(shape, dtype=dtype, device=device)
        if rows is not None and rows.shape[0]:
            padded[:rows.shape[0]] = rows
        pieces = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])

    def whole_batch(self, rows: torch.Tensor) -> torch.Tensor:
        """The global batch's rows (``B`` of them, in the single process's draw order) from each rank's share
        (``B / world_size`` rows: draws ``r, r + W, ...``); this rank's rows keep their autograd history, the
        others' are constants. Identity for a single process."""
        if not self.distributed:
            return rows
        pieces = [torch.empty_like(rows) for _ in range(self.world_size)]
        dist.all_gather(pieces, rows.detach().contiguous())
        pieces[self.rank] = rows
        # rank r's i-th row is draw i*W + r of the batch: interleave the shares back into draw order
        return torch.stack(pieces, dim=1).reshape(-1, *rows.shape[1:])

    def whole_batch_term(self, term: torch.Tensor) -> torch.Tensor:
        """A loss term computed identically on every rank from :meth:`whole_batch` rows: the same value, its
        gradient times the world size (each rank's gradient reaches its own rows only; DDP divides the sum by
        the world size). Exact only when the term reaches trained parameters through those rows alone (not,
        e.g., through a trained temperature every rank applies to the whole batch)."""
        if not self.distributed:
            return term
        return term + (self.world_size - 1) * (term - term.detach())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank (a collective: every rank must call it)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """Rank 0's named tensors on every rank (on the CPU when they were there on rank 0; moved through
        ``device``, since NCCL carries CUDA tensors only). Names, shapes and dtypes come from rank 0 too."""
        if not self.distributed:
            return tensors
        layout = self.broadcast({name: (tuple(t.shape), t.dtype, t.device.type) for name, t in tensors.items()})
        shared = {}
        for name, (shape, dtype, where) in layout.items():
            mine = tensors.get(name) if self.is_main else None
            moved = mine.detach().to(device).contiguous() if mine is not None else \
                torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(moved, src=0)
            shared[name] = moved.to("cpu" if where == "cpu" else device)
        return shared

    def wrap_losses(self, compute: Callable[[Any], dict[str, torch.Tensor]], parameters: Sequence[nn.Parameter],
                    device: torch.device) -> Callable[[Any], dict[str, torch.Tensor]]:
        """``compute`` (batch -> named loss terms) run through DistributedDataParallel over ``parameters`` (the
        optimiser's), so ``backward`` averages their gradients over the ranks; ``compute`` itself unchanged for a
        single process."""
        if not self.distributed:
            return compute
        module = _LossModule(compute, [p for p in parameters if p.requires_grad])
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


SINGLE = Parallel()


class _LossModule(nn.Module):
    """Holds the trained parameters (the very objects the model uses, not copies) so DDP hooks their gradients;
    its forward is the components' loss computation."""

    def __init__(self, compute: Callable[[Any], dict[str, torch.Tensor]], parameters: list[nn.Parameter]):
        super().__init__()
        self.compute = compute
        self.trained = nn.ParameterList(parameters)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.compute(batch)


def check_batch_sizes(batch_sizes: dict[str, int], world_size: int, flag: str = "--batch-size") -> None:
    """Refuse a global batch the processes cannot share equally (the averaged gradient would not be the global
    batch mean's). ``batch_sizes``: where it is set (a task) -> size; ``flag``: the flag that sets it."""
    if world_size <= 1:
        return
    bad = {name: size for name, size in batch_sizes.items() if size % world_size}
    if bad:
        listed = ", ".join(f"{name} {size}".strip() for name, size in bad.items())
        raise UserError(f"{flag} must be a multiple of the {world_size} processes (each takes an equal share "
                        f"of every batch); not: {listed}")
