"""Several processes, one job: rank, world size, device and backend from torchrun or SLURM, else one process.

:func:`resolve_distributed` is the one place that reads the launcher's environment:

* torchrun (``torchrun --nproc_per_node=N -m ...``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and
  ``MASTER_ADDR``/``MASTER_PORT``, which torchrun sets);
* SLURM (``srun python -m ...`` inside an allocation): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (the step's task
  count; ``SLURM_NTASKS`` when absent), ``SLURM_LOCALID``. The job script must export ``MASTER_ADDR`` (e.g. the
  first host of ``scontrol show hostnames``) and ``MASTER_PORT``. Run under ``srun``: a plain ``python`` in a batch
  script with ``--ntasks 4`` would otherwise wait for three processes that never start;
* neither: one process (rank 0 of 1).

The backend is NCCL on CUDA devices and gloo on the CPU. Process ``r`` uses ``cuda:<local rank>``. Only rank 0
writes files (:func:`is_main`).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from mtil.errors import UserError

INIT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" or "gloo" (unused by a single process)
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], name: str) -> int:
    text = environ.get(name, "")
    if not text.strip().isdigit():
        raise UserError(f"environment variable {name}={text!r} is not a non-negative integer (set by torchrun or "
                        f"srun; unset it to run as one process)")
    return int(text)


def _launch(environ: Mapping[str, str]) -> tuple[int, int, int, str]:
    """(rank, world size, local rank, launcher) from the environment."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _int(environ, "RANK"), _int(environ, "WORLD_SIZE"), \
            (_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0), "torchrun"
    if "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        world = _int(environ, tasks)
        if world > 1:
            return _int(environ, "SLURM_PROCID"), world, \
                (_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0), "slurm"
    return 0, 1, 0, "single"


def resolve_distributed(device: str = "auto", environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Rank, world size, local rank, device and backend of this process (see the module docstring).

    ``device``: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` (each process its
    ``cuda:<local rank>``) or ``cuda:N`` (one process only). A one-line UserError for an inconsistent environment or
    a device this machine does not have."""
    environ = os.environ if environ is None else environ
    rank, world, local, launcher = _launch(environ)
    if world < 1 or rank >= world:
        raise UserError(f"rank {rank} of a world of {world} processes ({launcher} environment): the launcher's "
                        f"variables are inconsistent")
    cuda = device == "cuda" or device.startswith("cuda:") or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device!r}: accepted: auto, cpu, cuda, cuda:N")
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
        count = torch.cuda.device_count()
        if device.startswith("cuda:"):
            if world > 1:
                raise UserError(f"--device {device} names one GPU, but {world} processes were started: give "
                                f"--device cuda (each process takes cuda:<local rank>)")
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= count:
                raise UserError(f"--device {device}: this machine has {count} CUDA device(s)")
            chosen = torch.device(device)
        else:
            if local >= count:
                raise UserError(f"local rank {local} needs cuda:{local}, but this machine has {count} CUDA "
                                f"device(s): start at most {count} processes per node")
            chosen = torch.device("cuda", local)
    else:
        chosen = torch.device("cpu")
    return DistributedEnv(rank, world, local, chosen, "nccl" if cuda else "gloo", launcher)


def launched_world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher started (1 without torchrun / srun); reads the environment only."""
    return _launch(os.environ if environ is None else environ)[1]


def init_distributed(env: DistributedEnv) -> None:
    """Join the process group (nothing for one process). Call after every check has passed on every rank."""
    if not env.distributed or dist.is_initialized():
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UserError(f"{env.world_size} processes ({env.launcher}) but {' and '.join(missing)} not set: export "
                        f"them in the job script (torchrun sets them itself)")
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    dist.init_process_group(env.backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=INIT_TIMEOUT)


def cleanup_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_rank() -> int:
    """This process's rank: the process group's once joined, else the launcher's (0 for a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _launch(os.environ)[0]


def is_main() -> bool:
    """True in the one process that writes files and prints progress (rank 0)."""
    return current_rank() == 0
