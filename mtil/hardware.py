"""Device and CPU threads: what a job on a shared machine or a cluster node should use, said out loud."""
from __future__ import annotations

import os
import sys

import torch

from mtil.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU (see :func:`announce_device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: accepted: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def announce_device(name: str, device: torch.device) -> None:
    """A loud line on stderr when ``--device auto`` fell back to the CPU (a cluster job that silently ran on the
    CPU wastes a day). Called once the checks passed, so a refused command still ends in one line."""
    if name == "auto" and device.type == "cpu":
        print("mtil: WARNING: --device auto found no CUDA GPU: running on the CPU (give --device cpu to "
              "silence this)", file=sys.stderr, flush=True)


def default_threads() -> int:
    """The CPUs this process may use (its affinity mask, e.g. a cgroup or taskset), capped by SLURM's
    ``SLURM_CPUS_PER_TASK``: torch's own default counts every core of the node, which oversubscribes a shared
    one."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        count = min(count, int(slurm))
    return max(1, count)


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` (or the default; ``OMP_NUM_THREADS``, when set, is respected); returns the count."""
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            return torch.get_num_threads()
        threads = default_threads()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
