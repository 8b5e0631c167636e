"""The original tools' spellings on mtil's command lines: each is read with the meaning its tool advertised, or
refused in one line naming mtil's flag for it.

CLIP-AST (seeds 000/001, a Dassl trainer) is run as ``python train.py --root ~/data --config-file ... --output-dir
... --stage1-epochs 1 --stage2-epochs 30 --k 6`` with Dassl's ``KEY VALUE`` overrides at the end
(``LMBD [1.0, 1.0, 0.5]``, ``DATALOADER.TRAIN_X.BATCH_SIZE 8``). :func:`translate_main` turns such a command line
into mtil's flags before it is parsed, printing a note for each translation so that the user learns mtil's names.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from mtil.errors import UserError

# the seed's flag -> mtil's (same meaning)
MAIN_ALIASES = {"--root": "--data-location", "--config-file": "--config", "--output-dir": "--save"}
# the seed's flag -> why it is refused and what to give instead
MAIN_REFUSED = {
    "--model-dir": "give --eval-only --load DIR/<Dataset>.pth (mtil's checkpoint of the task)",
    "--load-epoch": "mtil keeps the checkpoint of each task's end: give --eval-only --load DIR/<Dataset>.pth",
    "--resume": "run the same command again with the same --save: it resumes from the folder's latest checkpoint",
    "--eval-freq": "mtil counts evaluation intervals in steps: give --eval-interval STEPS (EVAL_FREQ epochs x the "
                   "task's steps per epoch)",
}
# Dassl's override keys (CLIP-AST's config) -> mtil's flag
DASSL_KEYS = {
    "LMBD": "--lmbd", "K": "--k", "STAGE1_EPOCHS": "--stage1-epochs", "STAGE2_EPOCHS": "--stage2-epochs",
    "STAGE2_LR": "--stage2-lr", "OPTIM.LR": "--stage2-lr", "RANDOM_SELECTION": "--random-selection",
    "DATALOADER.TRAIN_X.BATCH_SIZE": "--batch-size", "DATASET.NUM_SHOTS": "--shots", "DATASET.NAME": "--train-dataset",
    "SEED": "--seed", "OPTIM.WEIGHT_DECAY": "--wd", "DATASET.ROOT": "--data-location",
}
DASSL_REFUSED = {
    "OPTIM.GRAD_ACCUMULATION_STEPS": "mtil has no gradient accumulation: lower --batch-size, or run on several "
                                     "processes (torchrun) to keep the batch",
    "EVAL_FREQ": MAIN_REFUSED["--eval-freq"],
    "OPTIM.MAX_EPOCH": "give --stage2-epochs (CLIP-AST) or --epochs",
}
# Dassl's dataset names -> mtil's
DASSL_DATASETS = {
    "Caltech101": "Caltech101", "DescribableTextures": "DTD", "EuroSAT": "EuroSAT", "FGVCAircraft": "Aircraft",
    "Food101": "Food", "OxfordFlowers": "Flowers", "OxfordPets": "OxfordPet", "StanfordCars": "StanfordCars",
    "SUN397": "SUN397", "ImageNet": "ImageNet",
}
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")


def _note(text: str) -> None:
    print(f"mtil: note: {text}", file=sys.stderr)


def _dassl_value(tokens: list[str], start: int) -> tuple[list[str], int]:
    """The value tokens of the override at ``start`` (a ``[a, b, c]`` list spans tokens), and the next index."""
    first = tokens[start]
    if not first.startswith("["):
        return [first], start + 1
    parts, index = [], start
    while index < len(tokens):
        parts.append(tokens[index])
        index += 1
        if parts[-1].endswith("]"):
            break
    else:
        raise UserError(f"Dassl override list {' '.join(parts)} has no closing ']'")
    values = [v for v in re.split(r"[\s,\[\]]+", " ".join(parts)) if v]
    return values, index


def _dataset_flags(path: str) -> list[str]:
    """A Dassl dataset config (``--dataset-config-file``): its DATASET.NAME and NUM_SHOTS as mtil's flags."""
    from mtil.yaml_files import read_yaml

    document: Any = read_yaml(Path(path), "--dataset-config-file")
    dataset = document.get("DATASET") if isinstance(document, dict) else None
    if not isinstance(dataset, dict) or "NAME" not in dataset:
        raise UserError(f"--dataset-config-file {path}: no DATASET: NAME: in it (a Dassl dataset configuration)")
    flags = ["--train-dataset", _dataset_name(str(dataset["NAME"]))]
    if dataset.get("NUM_SHOTS") not in (None, -1):
        flags += ["--shots", str(dataset["NUM_SHOTS"])]
    return flags


def _dataset_name(name: str) -> str:
    return DASSL_DATASETS.get(name, name)


def translate_main(argv: Sequence[str], switches_of_parser: Callable[[], set[str]] | None = None) -> list[str]:
    """``argv`` with the CLIP-AST seeds' spellings (flags and trailing Dassl overrides) in mtil's terms; a seed
    flag mtil does without is a UserError naming what to give instead. ``switches_of_parser``: mtil.main's flags
    that take no value, asked only when the shipped spec is stale."""
    out: list[str] = []
    tokens = list(argv)
    switches = _switches(switches_of_parser)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        name = token.split("=", 1)[0]
        if name in MAIN_ALIASES:
            _note(f"{name} is {MAIN_ALIASES[name]} in mtil")
            out.append(token.replace(name, MAIN_ALIASES[name], 1))
            index += 1
        elif name in MAIN_REFUSED:
            raise UserError(f"{name} (CLIP-AST's Dassl flag) is not mtil's: {MAIN_REFUSED[name]}")
        elif name == "--dataset-config-file":
            value = token.split("=", 1)[1] if "=" in token else (tokens[index + 1] if index + 1 < len(tokens)
                                                                 else "")
            if not value:
                raise UserError("--dataset-config-file needs a file (a Dassl dataset configuration)")
            flags = _dataset_flags(value)
            _note(f"--dataset-config-file {value} is {' '.join(flags)} in mtil")
            out += flags
            index += 1 if "=" in token else 2
        elif _is_dassl_key(token) and not _value_of_previous(out, switches):
            if index + 1 >= len(tokens):
                raise UserError(f"Dassl override {token} has no value")
            values, index = _dassl_value(tokens, index + 1)
            if token in DASSL_REFUSED:
                raise UserError(f"{token} (a Dassl override) is not mtil's: {DASSL_REFUSED[token]}")
            if token not in DASSL_KEYS:
                raise UserError(f"unknown Dassl override {token}; mtil reads {', '.join(sorted(DASSL_KEYS))} (or give "
                                f"mtil's flags)")
            flag = DASSL_KEYS[token]
            if token == "DATASET.NAME":
                values = [_dataset_name(v) for v in values]
            if token == "RANDOM_SELECTION":
                flag = "--random-selection" if values[0].lower() in ("true", "1") else "--no-random-selection"
                values = []
            _note(f"{token} {' '.join(values)} is {flag} {' '.join(values)} in mtil".replace("  ", " "))
            out += [flag, *values]
        else:
            out.append(token)
            index += 1
    return out


def _switches(fallback: Callable[[], set[str]] | None) -> set[str] | None:
    """mtil.main's flags that take no value: from mtil.cli_spec, else (a stale spec: an edited source) from
    ``fallback`` (mtil.main passes the full parser's; this leaf module cannot import it), else None."""
    from mtil.cli_spec import load_spec

    spec = load_spec()
    if spec is not None:
        return {option for flag in spec["flags"] if flag["nargs"] == 0 for option in flag["options"]}
    return fallback() if fallback is not None else None


def _value_of_previous(out: list[str], switches: set[str] | None) -> bool:
    """Whether the next token is the value of the option just before it (``--save RUN.1``), not a Dassl key. Without
    the switches every ``--flag`` counts as taking a value: a key right after a switch is then read as its value."""
    if not out or not out[-1].startswith("--") or "=" in out[-1]:
        return False
    return switches is None or out[-1] not in switches


def _is_dassl_key(token: str) -> bool:
    """A Dassl override's key: one mtil knows, or any dotted upper-case key (``OPTIM.X``). No value of mtil's
    flags looks like either (a bare upper-case word such as a dataset name, SUN397, is left alone)."""
    return token in DASSL_KEYS or token in DASSL_REFUSED or ("." in token and bool(_KEY.match(token)))


# ---------------------------------------------------------------------------------------------- the IMO seed (004)
# dino_clip_training.py's flags that mean what an mtil.imo flag means
IMO_ALIASES = {"--output_dir": "--save", "--warmup_teacher_temp_epochs": "--warmup-teacher-epochs",
               "--oi_root": "--data-location"}
IMO_SEED_ONLY = {"--output_dir", "--adapter_train", "--distributed", "--freeze_last_layer", "--oi_root",
                 "--images_path", "--data_root", "--warmup_teacher_temp_epochs"}
DINO_LR_BATCH = 256  # DINO's rule: the peak learning rate is --lr x (total batch) / 256


def _world_size() -> int:
    import os

    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def translate_imo(argv: Sequence[str]) -> list[str]:
    """The IMO seed's ``dino_clip_training.py`` command line (004) in ``python -m mtil.imo``'s terms. Its ``--lr``
    is a base rate that DINO scales by the total batch / 256, mtil's the peak itself: on a command line in the
    seed's spelling (any of its own flags present) ``--lr`` is read the seed's way, with a note giving the peak."""
    tokens = list(argv)
    names = [t.split("=", 1)[0] for t in tokens]
    if not set(names) & IMO_SEED_ONLY:
        return tokens
    out: list[str] = []
    lr: str | None = None
    index = 0
    while index < len(tokens):
        token, name = tokens[index], names[index]
        value = token.split("=", 1)[1] if "=" in token else (tokens[index + 1] if index + 1 < len(tokens) else None)
        step = 1 if "=" in token else 2
        if name in IMO_ALIASES:
            _note(f"{name} is {IMO_ALIASES[name]} in mtil.imo")
            out += [IMO_ALIASES[name]] + ([] if value is None else [value])
            index += step
        elif name == "--adapter_train":  # the seed's DINO script trains the adapter: mtil.imo's dino mode
            if "--mode" not in names:
                _note("--adapter_train (dino_clip_training.py) is --mode dino in mtil.imo")
                out += ["--mode", "dino"]
            index += 1
        elif name == "--distributed":
            if _world_size() == 1:
                raise UserError("--distributed: start the command with torchrun (torchrun --nproc_per_node=N -m "
                                "mtil.imo ...); mtil.imo trains on every process torchrun starts")
            index += 1
        elif name == "--freeze_last_layer":
            if value not in ("0", "0.0"):
                raise UserError(f"--freeze_last_layer {value}: mtil.imo never freezes the DINO head's last layer "
                                f"(the seed's command uses 0)")
            index += step
        elif name == "--images_path":  # its Open Images list (ImageID, DisplayName): a CSV set of mtil's
            _note(f"--images_path {value} is --data CSV:{value} in mtil.imo (images <--oi_root>/<ImageID>.jpg)")
            out += ["--data", f"CSV:{value}"]
            index += step
        elif name == "--data_root":  # Dassl's data folder, for the seed's evaluation datasets: DINO never reads it
            _note(f"--data_root {value} (the seed's Dassl data folder) is not read by the adapter's training: "
                  f"ignored (mtil.imo reads --images_path's images under --oi_root)")
            index += step
        elif name == "--lr":
            lr = value
            index += step
        else:
            out.append(token)
            index += 1
    if lr is not None:
        batch = None
        for i, t in enumerate(out):  # the last one given wins, as in argparse; --batch_size=40 or --batch_size 40
            name, _, inline = t.partition("=")
            if name in ("--batch-size", "--batch_size"):
                batch = inline if inline else (out[i + 1] if i + 1 < len(out) else None)
        try:
            total = int(batch) * _world_size() if batch is not None else None
            peak = float(lr) * total / DINO_LR_BATCH if total is not None else None
        except ValueError:
            peak = None
        if peak is None:
            raise UserError(f"--lr {lr} in the seed's spelling is a base rate scaled by the total batch / 256: give "
                            f"--batch_size too, or mtil's --lr (the peak itself)")
        _note(f"--lr {lr} is the seed's base rate: x {total} images per step / {DINO_LR_BATCH} = peak --lr "
              f"{peak:.4g} in mtil.imo")
        out += ["--lr", f"{peak:.6g}"]
    return out
