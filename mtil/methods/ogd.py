"""Orthogonal Gradient Descent across tasks (``--orthogonal-gradients N``).

During each task the gradients of the tracked weights (``--ogd-params``, fnmatch patterns; by default the 2-D
weight matrices of the attention and MLP layers of both encoders, only those with ``requires_grad``) are recorded
at ``N`` evenly spaced steps, right after ``loss.backward()`` and *before* any projection (they describe the task's
own loss). At the task's end the ``K <= N`` snapshots of each weight are turned into an orthonormal basis
(:func:`orthonormal_basis`: SVD, keeping the leading directions that hold ``--ogd-energy`` of the squared singular
values), merged with the earlier tasks' basis (:func:`merge_bases`: the new directions' residual off the old basis,
re-orthonormalised by SVD, appended; the old rows are kept unchanged) and written to ``grad_<Dataset>.pth`` beside
the checkpoints in ``--save``. On every later task, each tracked gradient ``g`` is projected off that basis after
backward (:func:`project_out`): ``g <- g - B^T (B g)``.

Files. ``grad_<Dataset>.pth`` is ``{"format": "mtil-ogd-basis", "version": 1, "energy": e, "tasks": [...],
"basis": {param name: K x numel float32}}`` holding the basis of *all* tasks so far (an atomic write, loadable with
``torch.load(weights_only=True)``). ``--orthogonal-gradients-path FILE`` loads such a file (or a plain
``{name: K x numel}`` dict of orthonormal rows) to continue a chain of one-task processes; raw gradient snapshots
(``--ogd-save-raw`` writes ``grad_raw_<Dataset>.pth``) are converted with ``scripts/convert_grad_to_basis.py``.
The basis and the current task's snapshots are also part of the component's ``state_dict``, so a resumed run
projects with exactly the same basis and ends with exactly the same one.

Memory. Snapshots live on the CPU in ``--ogd-dtype`` (float32 or float16); the basis is float32, ``K x numel`` per
tracked weight, kept on the CPU (method state, checkpoints) and once more on the training device for projection.
``K`` is at most ``N x tasks so far`` (and at most ``numel``); the energy threshold usually keeps fewer.
For ViT-B/16 the default patterns track 96 matrices (48 per encoder) with 122,683,392 elements (82% of its
149.6M parameters; counted from ``OPENAI_ARCHITECTURES["ViT-B/16"]`` built on the meta device), so:

* one recorded step costs 490.7 MB (468 MiB) of CPU memory in float32, 245.4 MB (234 MiB) in float16;
  a task holds ``N`` of them (N = 10: 4.6 GiB / 2.3 GiB), and mid-task checkpoints carry them too;
* one basis direction costs 468 MiB (float32), on the device and in every checkpoint's method state: the basis is
  bounded by ``N x tasks x 468 MiB`` (e.g. N = 5 over the 11 MTIL tasks: at most 55 directions, 25 GiB).

Caveats. With AdamW the projected gradient is rescaled per coordinate (and decoupled weight decay is applied), so
the *update* is not exactly orthogonal to the basis as it is with plain SGD (the original OGD); only the gradient
is. Under distributed data-parallel training the projection must run after the gradients' all-reduce (it does here
because the engine calls ``after_backward`` once ``loss.backward()`` has returned; with DDP's overlapping
all-reduce, a ``no_sync`` or gradient hook would need the same ordering), else each rank would project a
different, partial gradient. The recorded snapshots are the all-reduced gradients, the same on every rank; the
merged basis is broadcast from rank 0 at each task's end, so every rank projects with the very same one.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch

from mtil.atomic import atomic_open
from mtil.engine.gradients import GradientTracker
from mtil.engine.method import Component
from mtil.errors import UserError
from mtil.evaluation.metrics_io import safe_name
from mtil.flags import add_flag, energy_fraction, name_list, positive_int
from mtil.models.train_modes import CLIP_TRAINING_MODES, wanted_by_mode
from mtil.registry import register
from mtil.tensor_files import read_tensor_file, save_tensors

DEFAULT_PATTERNS = ["*attn.in_proj_weight", "*attn.out_proj.weight", "*mlp.c_fc.weight", "*mlp.c_proj.weight"]
BASIS_FORMAT = "mtil-ogd-basis"
RAW_FORMAT = "mtil-ogd-raw"
MERGE_TOL = 1e-4  # residual singular values below this are directions already in the old basis (rows are unit)


# --------------------------------------------------------------------------- basis math (pure functions)
def orthonormal_basis(snapshots: torch.Tensor, energy: float = 0.97, rank_tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal rows spanning the leading directions of ``snapshots`` (K x n, one flattened gradient a row).

    Keeps the fewest right singular vectors whose squared singular values reach ``energy`` of the total (all
    directions above ``rank_tol`` x the largest singular value when ``energy`` is 1). Computed in float64,
    returned as float32 ``r x n`` (``0 x n`` when every snapshot is zero).
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    m = snapshots.reshape(snapshots.shape[0], -1).to(torch.float64)
    n = m.shape[1]
    if m.shape[0] == 0:
        return torch.zeros(0, n)
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return torch.zeros(0, n)
    rank = int((s > rank_tol * s[0]).sum())
    power = s[:rank] ** 2
    ratio = torch.cumsum(power, 0) / power.sum()
    keep = int((ratio < energy - 1e-12).sum()) + 1
    return vh[:min(keep, rank)].to(torch.float32).contiguous()


def merge_bases(old: torch.Tensor | None, new: torch.Tensor, tol: float = MERGE_TOL) -> torch.Tensor:
    """One orthonormal basis spanning the rows of ``old`` and of ``new`` (both orthonormal, r x n).

    ``old``'s rows are kept as they are; the part of ``new`` outside their span (projected off twice, for
    numerical stability) is re-orthonormalised by SVD, keeping singular values above ``tol`` (smaller ones are
    directions ``old`` already holds), and appended. Computed in float64, returned as float32.
    """
    new = new.to(torch.float64)
    if old is None or old.shape[0] == 0:
        if new.shape[0] == 0:
            return new.to(torch.float32)
        _, s, vh = torch.linalg.svd(new, full_matrices=False)
        return vh[:int((s > tol).sum())].to(torch.float32).contiguous()
    old64 = old.to(torch.float64)
    if new.shape[0] == 0:
        return old.to(torch.float32).contiguous()
    if old64.shape[1] != new.shape[1]:
        raise ValueError(f"bases of different widths: {old64.shape[1]} and {new.shape[1]}")
    residual = new - (new @ old64.T) @ old64
    residual = residual - (residual @ old64.T) @ old64
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)
    added = vh[:int((s > tol).sum())]
    return torch.cat([old64, added]).to(torch.float32).contiguous()


def project_out(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``g - B^T (B g)`` for a gradient of any shape (flattened against the ``K x numel`` basis ``B``)."""
    if basis.shape[0] == 0:
        return grad.clone()
    flat = grad.reshape(-1)
    basis = basis.to(device=flat.device, dtype=flat.dtype)
    return (flat - basis.T @ (basis @ flat)).view_as(grad)


def _canonical(basis: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh row-major copy on ``device``. The matrix products of the projection round differently for the same
    values in another memory layout (a one-row basis may have strides (1, 1) or (n, 1)), so the basis a resume
    loads, another rank receives or this run merged is always laid out alike: the projection is then bitwise the
    same in each case."""
    return torch.empty(basis.shape, dtype=basis.dtype, device=device).copy_(basis)


def is_orthonormal(basis: torch.Tensor, atol: float = 1e-3) -> bool:
    if basis.dim() != 2:
        return False
    gram = basis.to(torch.float64) @ basis.to(torch.float64).T
    return bool(torch.allclose(gram, torch.eye(basis.shape[0], dtype=torch.float64), atol=atol))


# --------------------------------------------------------------------------- files
def save_basis(path: str | Path, basis: dict[str, torch.Tensor], tasks: list[str], energy: float) -> Path:
    """Atomically write a basis file, with its checksums (:mod:`mtil.tensor_files`)."""
    path = Path(path)
    payload = {"format": BASIS_FORMAT, "version": 1, "energy": float(energy), "tasks": list(tasks),
               "basis": {n: b.detach().to("cpu", torch.float32).contiguous() for n, b in basis.items()}}
    with atomic_open(path, "wb") as handle:
        save_tensors(payload, handle)
    return path


def save_raw(path: str | Path, gradients: dict[str, torch.Tensor], task: str, steps: list[int]) -> Path:
    path = Path(path)
    payload = {"format": RAW_FORMAT, "version": 1, "task": task, "steps": list(steps),
               "gradients": {n: g.detach().cpu().contiguous() for n, g in gradients.items()}}
    with atomic_open(path, "wb") as handle:
        save_tensors(payload, handle)
    return path


def load_basis(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(basis per parameter name, tasks it covers) from a ``grad_<Dataset>.pth`` file or a plain dict of
    orthonormal ``K x numel`` tensors. Raw gradients are refused (convert them first)."""
    path = Path(path)
    payload = read_tensor_file(path, "OGD basis")
    if not isinstance(payload, dict):
        raise UserError(f"{path} is not an OGD basis file (expected a dict)")
    if payload.get("format") == RAW_FORMAT:
        raise UserError(f"{path} holds raw gradients, not a basis: convert it with "
                        f"scripts/convert_grad_to_basis.py --input {path} --output BASIS.pth")
    tasks = [str(t) for t in payload.get("tasks", [])] if payload.get("format") == BASIS_FORMAT else []
    tensors = payload.get("basis") if payload.get("format") == BASIS_FORMAT else payload
    if not isinstance(tensors, dict) or not tensors or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise UserError(f"{path} is not an OGD basis file (expected {{parameter name: K x numel tensor}})")
    basis = {}
    for name, value in tensors.items():
        value = value.to(torch.float32)
        if value.dim() != 2 or not is_orthonormal(value):
            raise UserError(f"{path}: the basis of {name} is not orthonormal rows (raw gradients? convert them "
                            f"with scripts/convert_grad_to_basis.py)")
        basis[name] = value.contiguous()
    return basis, tasks


# --------------------------------------------------------------------------- the component
@register
class OrthogonalGradients(Component):
    """Records gradients during a task, projects later tasks' gradients off their orthonormal basis."""

    name = "ogd"
    supports_distributed = True  # projects the all-reduced gradients; the basis is broadcast (module docstring)
    summary = "orthogonal gradient descent across tasks"
    enable_flag = "--orthogonal-gradients N"
    flag_group = ("Orthogonal gradients (OGD)",
                  "Project each task's gradients off the directions earlier tasks' gradients spanned "
                  "(see mtil/methods/ogd.py).")
    train_modes = CLIP_TRAINING_MODES  # fc trains only a head on frozen features
    order = 60.0  # only touches gradients: its place in the order is free

    @classmethod
    def add_arguments(cls, group) -> None:
        add_flag(group, "--orthogonal-gradients", type=positive_int, default=None, metavar="N",
                 help="Record the tracked weights' gradients at N evenly spaced steps of each task; at the task's "
                      "end keep their orthonormal basis (merged with earlier tasks', written to grad_<Dataset>.pth "
                      "in --save) and project every later task's gradients off it. With --optimizer sgd (no "
                      "momentum, no --wd) the update itself is orthogonal to the basis; with AdamW only the "
                      "gradient is.")
        add_flag(group, "--orthogonal-gradients-path", default=None, metavar="FILE", path=True,
                 help="Start from this basis file (a previous process's grad_<Dataset>.pth) to continue a chain of "
                      "one-task runs.")
        add_flag(group, "--ogd-energy", type=energy_fraction, default=0.97,
                 help="Keep the leading singular directions of a task's gradients that hold this fraction of their "
                      "energy.")
        add_flag(group, "--ogd-params", type=name_list, default=list(DEFAULT_PATTERNS), metavar="PATTERNS",
                 help="Comma-separated parameter-name patterns (fnmatch) of the tracked weights (trainable ones "
                      "only).")
        add_flag(group, "--ogd-dtype", default="float32", choices=["float32", "float16"],
                 help="Precision of the gradient snapshots kept on the CPU during a task (the basis is float32).")
        add_flag(group, "--ogd-save-raw", action="store_true",
                 help="Also write each task's raw gradient snapshots to grad_raw_<Dataset>.pth "
                      "(scripts/convert_grad_to_basis.py turns them into a basis).")

    @classmethod
    def enabled(cls, config) -> bool:
        return config.orthogonal_gradients is not None

    @classmethod
    def check_config(cls, config) -> None:
        if not config.ogd_params:
            raise UserError("--ogd-params needs at least one parameter-name pattern")
        path = config.orthogonal_gradients_path
        if path and not Path(path).is_file():
            raise UserError(f"--orthogonal-gradients-path {path} does not exist")

    def check_inputs(self) -> None:
        if self.config.orthogonal_gradients_path:
            self.basis, self.tasks = load_basis(self.config.orthogonal_gradients_path)

    def check_model(self, model) -> None:
        """The patterns must select trainable weights of this model, and a loaded basis must fit them."""
        cfg = self.config
        names = [n for n, _ in model.named_parameters() if wanted_by_mode(n, cfg.train_mode, cfg.freeze)
                 and any(fnmatch.fnmatchcase(n, pat) for pat in self.patterns)]
        if not names:
            examples = [n for n, p in model.named_parameters() if p.dim() == 2 and
                        wanted_by_mode(n, cfg.train_mode, cfg.freeze)][:3]
            raise UserError(f"--ogd-params {','.join(self.patterns)} matches no trainable weight of this model "
                            f"(--train-mode {cfg.train_mode}); trainable weights are e.g. {', '.join(examples)}")
        params = dict(model.named_parameters())
        for name, basis in self.basis.items():
            if name in params and basis.shape[1] != params[name].numel():
                raise UserError(f"OGD basis of {name} has {basis.shape[1]} columns but the weight has "
                                f"{params[name].numel()} elements (a basis from another model?)")

    def __init__(self, config):
        super().__init__(config)
        self.count = int(config.orthogonal_gradients)
        self.energy = float(getattr(config, "ogd_energy", 0.97))
        self.patterns = list(getattr(config, "ogd_params", None) or DEFAULT_PATTERNS)
        self.dtype = torch.float16 if getattr(config, "ogd_dtype", "float32") == "float16" else torch.float32
        self.basis: dict[str, torch.Tensor] = {}  # CPU float32, K x numel per parameter: all finished tasks
        self.tasks: list[str] = []  # the tasks the basis covers (check_inputs reads --orthogonal-gradients-path)
        self.names: list[str] = []  # tracked in the current task
        self.tracker: GradientTracker | None = None
        self._pending_tracker: dict | None = None  # tracker state of a mid-task resume, applied when built
        self._device_basis: dict[str, torch.Tensor] | None = None

    def tracked_names(self, model: torch.nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters()
                if p.requires_grad and any(fnmatch.fnmatchcase(n, pat) for pat in self.patterns)]

    def before_task(self, run, task) -> None:
        self.names = self.tracked_names(run.model)
        if not self.names:
            raise UserError(f"--orthogonal-gradients: --ogd-params {','.join(self.patterns)} matches no trainable "
                            f"weight (--train-mode {run.config.train_mode})")
        params = dict(run.model.named_parameters())
        for name, basis in self.basis.items():
            if name in params and basis.shape[1] != params[name].numel():
                raise UserError(f"OGD basis of {name} has {basis.shape[1]} columns but the weight has "
                                f"{params[name].numel()} elements (a basis from another model?)")
        self.tracker, self._pending_tracker, self._device_basis = None, None, None

    def _ensure_tracker(self, run) -> GradientTracker:
        if self.tracker is None:
            steps = GradientTracker.evenly_spaced(self.count, run.task.total_steps)
            self.tracker = GradientTracker(run.model, self.names, steps, dtype=self.dtype)
            if self._pending_tracker is not None:
                self.tracker.load_state_dict(self._pending_tracker)
                self._pending_tracker = None
        return self.tracker

    @torch.no_grad()
    def after_backward(self, run) -> None:
        """Record this step's raw gradients (at the chosen steps), then project them off the earlier tasks' basis.

        Under distributed training this must run after the gradients' all-reduce (see the module docstring).
        With fp16 loss scaling, a step whose gradients overflowed is skipped by the scaler: it is neither recorded
        nor projected (its inf/NaN gradients would poison the basis)."""
        tracker = self._ensure_tracker(run)
        if run.task.scaler is not None and not all(torch.isfinite(p.grad).all() for p in tracker.params.values()
                                                   if p.grad is not None):
            return
        tracker.maybe_record(run.state.step)  # state.step: index of the step in progress
        if not self.basis:
            return
        if self._device_basis is None:
            params = dict(run.model.named_parameters())
            self._device_basis = {n: _canonical(self.basis[n], params[n].device) for n in self.names
                                  if n in self.basis and self.basis[n].shape[0] > 0}
        params = self.tracker.params
        for name, basis in self._device_basis.items():
            grad = params[name].grad
            if grad is not None:
                grad.copy_(project_out(grad, basis))

    def after_task(self, run, task) -> None:
        tracker = self._ensure_tracker(run)
        for name in tracker.names:
            stacked = tracker.stacked(name)
            if stacked.numel() == 0:
                continue
            new = orthonormal_basis(stacked.to(torch.float32), self.energy)
            self.basis[name] = merge_bases(self.basis.get(name), new)
        self.basis = run.parallel.broadcast_tensors(self.basis, run.device)
        self.tasks.append(task.name)
        if run.save_dir is not None:
            save_basis(run.save_dir / f"grad_{safe_name(task.name)}.pth", self.basis, self.tasks, self.energy)
            if getattr(self.config, "ogd_save_raw", False):
                save_raw(run.save_dir / f"grad_raw_{safe_name(task.name)}.pth",
                         {n: tracker.stacked(n) for n in tracker.names}, task.name, tracker.recorded_steps)
        ranks = {n: b.shape[0] for n, b in self.basis.items()}
        run.log.info("ogd: basis after %s: %d weights, %d directions in all (max %d per weight)", task.name,
                     len(ranks), sum(ranks.values()), max(ranks.values(), default=0))
        self.tracker, self._pending_tracker, self._device_basis = None, None, None

    def state_dict(self) -> dict[str, Any]:
        # The basis tensors are never changed in place (merging makes new ones): no copy of a possibly huge basis.
        tracker = self.tracker.state_dict() if self.tracker is not None else self._pending_tracker
        return {"basis": dict(self.basis), "tasks": list(self.tasks), "tracker": tracker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "basis" not in state:
            return
        self.basis = {n: b.to("cpu", torch.float32) for n, b in state["basis"].items()}
        self.tasks = list(state.get("tasks", []))
        self.tracker, self._device_basis = None, None
        self._pending_tracker = state.get("tracker")
