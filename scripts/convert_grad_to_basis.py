"""Turn raw gradient snapshots into an OGD basis file that ``--orthogonal-gradients-path`` accepts.

    python scripts/convert_grad_to_basis.py --input grad_raw.pth --output basis.pth [--energy 0.97]
        [--previous grad_DTD.pth]

The input is any ``torch.save``d dict of ``{parameter name: K x numel}`` stacked gradients (a 1-D tensor is one
snapshot; other shapes are flattened per row), or the ``grad_raw_<Dataset>.pth`` that ``--ogd-save-raw`` writes.
Each weight's snapshots become orthonormal rows (SVD, the leading directions holding ``--energy`` of the energy);
``--previous`` merges them with an existing basis file (its rows kept, the new directions appended).
The output is written atomically in the format of ``grad_<Dataset>.pth`` and loads with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtil.errors import UserError  # noqa: E402
from mtil.tensor_files import read_tensor_file  # noqa: E402
from mtil.methods.ogd import (  # noqa: E402
    BASIS_FORMAT,
    RAW_FORMAT,
    load_basis,
    merge_bases,
    orthonormal_basis,
    save_basis,
)


def read_gradients(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    payload = read_tensor_file(path, "gradient file")  # verified against its checksums when mtil wrote it
    tasks: list[str] = []
    if isinstance(payload, dict) and payload.get("format") == RAW_FORMAT:
        tasks = [str(payload.get("task"))]
        payload = payload["gradients"]
    if not isinstance(payload, dict) or not payload:
        raise UserError(f"{path}: expected a dict {{parameter name: K x numel gradients}}")
    gradients = {}
    for name, value in payload.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {name!r} is not a tensor")
        if value.dim() == 1:
            value = value.unsqueeze(0)
        gradients[str(name)] = value.reshape(value.shape[0], -1).to(torch.float32)
    return gradients, tasks


def _is_basis_file(path: Path) -> bool:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == BASIS_FORMAT


def convert(input_path: Path, output_path: Path, energy: float, previous: Path | None = None) -> dict[str, int]:
    """Write the basis; returns the number of directions kept per parameter.

    An input that already is a basis (the ``grad_<Dataset>.pth`` mtil writes; the original tool wrote raw
    gradients under that name) is taken as it is: re-selecting directions by energy would drop some of its
    equally weighted orthonormal rows."""
    basis, old_tasks = load_basis(previous) if previous is not None else ({}, [])
    if _is_basis_file(input_path):
        rows, tasks = load_basis(input_path)
        print(f"{input_path} is already a basis (mtil writes grad_<Dataset>.pth as one): kept as it is")
        for name, value in rows.items():
            basis[name] = value if name not in basis else merge_bases(basis[name], value)
        save_basis(output_path, basis, old_tasks + [t for t in tasks if t not in old_tasks], energy)
        return {n: b.shape[0] for n, b in basis.items()}
    gradients, tasks = read_gradients(input_path)
    for name, snapshots in gradients.items():
        if name in basis and basis[name].shape[1] != snapshots.shape[1]:
            raise UserError(f"{name}: {snapshots.shape[1]} gradient elements but the previous basis has "
                            f"{basis[name].shape[1]} columns")
        basis[name] = merge_bases(basis.get(name), orthonormal_basis(snapshots, energy))
    save_basis(output_path, basis, old_tasks + tasks, energy)
    return {n: b.shape[0] for n, b in basis.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="raw gradients: {name: K x numel}")
    parser.add_argument("--output", required=True, type=Path, help="basis file to write")
    parser.add_argument("--energy", type=float, default=0.97, help="fraction of the energy the kept directions hold")
    parser.add_argument("--previous", type=Path, default=None, help="a basis file to merge with")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.energy <= 1:
            raise UserError(f"--energy must be in (0, 1], got {args.energy}")
        for path in (args.input, args.previous):
            if path is not None and not path.is_file():
                raise UserError(f"{path} does not exist")
        ranks = convert(args.input, args.output, args.energy, args.previous)
    except UserError as exc:
        print(f"convert_grad_to_basis: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(ranks)} weights, {sum(ranks.values())} directions "
          f"(max {max(ranks.values(), default=0)} per weight)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
