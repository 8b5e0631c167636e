"""``--model toyclip``: the built-in benchmark's pre-trained tiny CLIP, shipped with mtil.

The file ``mtil/assets/toyclip.pt`` is written by ``scripts/pretrain_toyclip.py`` (contrastive training on the
ToyWorld captions). It keeps only the token-embedding rows of the words the benchmark uses (its captions, class
names and templates): the other 49 000-odd rows of CLIP's vocabulary are never read by ToyWorld prompts, so the
file stays small. They are rebuilt as zeros; a prompt with other words still runs, those words just carry no
meaning. The file is checked against its SHA-256 before it is read, so every clone starts from the same model.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from mtil.errors import UserError
from mtil.models.architectures import Architecture

TOYCLIP = "toyclip"
ASSET = Path(__file__).resolve().parent.parent / "assets" / "toyclip.pt"
# The SHA-256 of the shipped file; scripts/pretrain_toyclip.py prints the value for a file it writes.
SHA256 = "c33b195fd47d3068834f329ea7bd95453ecc4e9e6114ccc93691fb898bd169f7"
FORMAT = "mtil-toyclip"
REBUILD = "python scripts/pretrain_toyclip.py (6 minutes on a GPU, about 30 on 2 CPU cores)"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trim(state_dict: dict[str, torch.Tensor], token_ids: list[int]) -> dict[str, torch.Tensor]:
    """The state dict with the token embedding cut to ``token_ids``' rows (what the asset stores)."""
    out = {k: v.detach().clone() for k, v in state_dict.items()}
    out["token_embedding.weight"] = out["token_embedding.weight"][torch.tensor(sorted(token_ids))]
    return out


def write_asset(path: Path, state_dict: dict[str, torch.Tensor], arch: Architecture, token_ids: list[int],
                meta: dict) -> str:
    """Write the trimmed weights to ``path``; returns its SHA-256."""
    payload = {"format": FORMAT, "arch": arch.to_dict(), "token_ids": torch.tensor(sorted(token_ids)),
               "weights": trim(state_dict, token_ids), "meta": meta}
    buffer = io.BytesIO()  # not torch.save(path): the archive would record the file's name, and so would the hash
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return file_sha256(path)


def read_asset(path: Path = ASSET, sha256: str | None = SHA256) -> tuple[dict[str, torch.Tensor], Architecture]:
    """The full CLIP state dict and architecture from a trimmed file (checked against ``sha256`` unless None)."""
    if not path.is_file():
        raise UserError(f"--model {TOYCLIP}: its weights file {path} is missing; restore it with "
                        f"`git checkout {path.name}` or re-create it with {REBUILD}")
    if sha256 is not None and file_sha256(path) != sha256:
        raise UserError(f"--model {TOYCLIP}: {path} does not match its SHA-256 (damaged or replaced); restore it "
                        f"with `git checkout` or re-create it with {REBUILD} and update SHA256 in {__file__}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    arch = Architecture.from_dict(payload["arch"])
    weights = dict(payload["weights"])
    rows = weights.pop("token_embedding.weight")
    embedding = torch.zeros(arch.vocab_size, rows.shape[1], dtype=rows.dtype)
    embedding[payload["token_ids"]] = rows
    weights["token_embedding.weight"] = embedding
    return weights, arch
