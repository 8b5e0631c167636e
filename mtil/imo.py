"""``python -m mtil.imo``: train the IMO adapter on a generic image set (see :mod:`mtil.adapters.imo_train`).

    python -m mtil.imo --model ViT-B/16 --data CSV:data/openimages/subset.csv --mode supervised --epochs 10 \\
        --save ckpt/imo_supervised
    torchrun --nproc_per_node=3 -m mtil.imo --model ViT-B/16 --data CSV:data/openimages/subset.csv --mode dino \\
        --epochs 10 --batch-size 40 --momentum-teacher 0.9998 --save ckpt/imo_dino

Bad input is one line (``mtil.imo: error: ...``, exit code 2), reported before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mtil.errors import UserError, path_error
from mtil.seed_flags import translate_imo
from mtil.flags import (DefaultsHelpFormatter, _OneLineParser, add_flag, dropout, non_negative_float, non_negative_int,
                        open_unit_interval, positive_float, positive_int, seed_int, worker_count)

PROG = "python -m mtil.imo"


def _mode_default(key: str) -> str:
    from mtil.adapters.imo_train import MODE_DEFAULTS

    return ", ".join(f"{mode} {values[key]:g}" for mode, values in MODE_DEFAULTS.items())


def build_parser() -> argparse.ArgumentParser:
    from mtil.adapters.imo_train import DINO_DEFAULTS, MODES

    parser = _OneLineParser(prog=PROG, allow_abbrev=False, formatter_class=DefaultsHelpFormatter,
                            description="Train the IMO adapter (a bottleneck beside the MLP of every block of CLIP's "
                                        "image encoder, CLIP frozen) on a generic image set; writes "
                                        "<save>/imo_adapter.pt and <save>/imo_log.csv.")
    g = parser.add_argument_group(
        "IMO adapter training (python -m mtil.imo)",
        "Supervised (a linear head on the set's labels) or self-supervised (DINO self-distillation with an EMA "
        "teacher, multi-crop); runs under torchrun/srun on several processes (docs/methods/imo.md).")
    add_flag(g, "--model", default="ViT-B/16",
             help="A ViT CLIP: an OpenAI name (ViT-B/32, ViT-B/16, ViT-L/14, ...), toyclip, tiny-vit, micro-vit, or "
                  "a weights file. A ResNet CLIP is refused.")
    add_flag(g, "--clip-root", default="clip", path=True, help="Folder holding the OpenAI CLIP weight files.")
    add_flag(g, "--data", required=True, metavar="DATASET",
             help="The generic image set: a registered dataset name (e.g. ToyShape, ImageNet, ImageFolder:PATH) or "
                  "CSV:PATH (a CSV with columns path,label; optional split). Its train split is used.")
    add_flag(g, "--data-location", default="data", path=True, help="Root folder of the named datasets.")
    add_flag(g, "--mode", default="supervised", choices=list(MODES),
             help="supervised: a linear head on the set's labels, cross-entropy; dino: self-distillation with an "
                  "EMA teacher, multi-crop, centering and sharpening.")
    add_flag(g, "--epochs", type=positive_int, default=10, help="Passes over the training set.")
    add_flag(g, "--batch-size", type=positive_int, default=None,
             help=f"Images per step per process (default: {_mode_default('batch_size')}).")
    add_flag(g, "--lr", type=positive_float, default=None,
             help=f"Peak AdamW learning rate (default: {_mode_default('lr')}); not rescaled by the batch size.")
    add_flag(g, "--wd", type=non_negative_float, default=None,
             help=f"AdamW weight decay of the weight matrices, none on biases (default: {_mode_default('wd')}).")
    add_flag(g, "--warmup-epochs", type=non_negative_float, default=None,
             help="Linear lr warm-up, in epochs (fractions allowed), then a cosine to 0 (default: supervised 0, "
                  "dino min(2, epochs / 5): the seed's 2 of 10).")
    add_flag(g, "--scale", type=positive_float, default=None,
             help=f"The adapter's output factor (default: {_mode_default('scale')}: the paper's).")
    add_flag(g, "--width", type=positive_int, default=64, help="Bottleneck width of each adapter.")
    add_flag(g, "--dropout", type=dropout, default=0.1, help="Dropout inside each adapter while training.")
    add_flag(g, "--local-crops", type=non_negative_int, default=None,
             help=f"dino: local crops per image besides the 2 global ones (default {DINO_DEFAULTS['local_crops']}); "
                  "resized to CLIP's input resolution.")
    add_flag(g, "--momentum-teacher", type=open_unit_interval, default=None,
             help=f"dino: base EMA momentum of the teacher, raised to 1 by a cosine over the run (default "
                  f"{DINO_DEFAULTS['momentum_teacher']}; the seed's Open Images run used 0.9998).")
    add_flag(g, "--teacher-temp", type=positive_float, default=None,
             help=f"dino: teacher temperature after the warm-up (default {DINO_DEFAULTS['teacher_temp']}).")
    add_flag(g, "--warmup-teacher-temp", type=positive_float, default=None,
             help=f"dino: teacher temperature of the first epoch (default {DINO_DEFAULTS['warmup_teacher_temp']}).")
    add_flag(g, "--warmup-teacher-epochs", type=non_negative_int, default=None,
             help=f"dino: epochs over which the teacher temperature rises (default "
                  f"{DINO_DEFAULTS['warmup_teacher_epochs']}, the seed's).")
    add_flag(g, "--dino-out-dim", type=positive_int, default=None,
             help=f"dino: prototypes of the projection head (default {DINO_DEFAULTS['dino_out_dim']}, DINO's).")
    add_flag(g, "--save", required=True, metavar="DIR", path=True,
             help="Folder for imo_adapter.pt and imo_log.csv (refused when it already holds imo_adapter.pt).")
    add_flag(g, "--device", default="auto",
             help="auto, cpu, cuda (several processes: each its cuda:<local rank>) or cuda:N (one process).")
    add_flag(g, "--workers", type=worker_count, default=2, help="DataLoader worker processes per process.")
    add_flag(g, "--threads", type=positive_int, default=None, help="CPU threads of torch per process.")
    add_flag(g, "--seed", type=seed_int, default=0,
             help="Seeds the heads, the adapters' initialisation, the data order (the same on every process) and "
                  "the augmentations (seed + rank).")
    add_flag(g, "--log-every", type=non_negative_int, default=50, help="Print a line every N steps (0: never).")
    return parser


def check_command_line(argv: Sequence[str]) -> int | None:
    """The checks that need no file (``python -m mtil.launch`` runs them before starting workers): the exit code
    when the command is answered here (``--help``: 0; a refusal, printed in one line: 2), else None."""
    from mtil.adapters import imo_train

    try:
        options = build_parser().parse_args(translate_imo(list(argv)))
        imo_train.resolve_settings(vars(options))
    except UserError as exc:
        print(f"mtil.imo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from mtil.adapters import imo_train
    from mtil.distributed import resolve_distributed
    from mtil.hardware import announce_device

    try:
        argv = translate_imo(list(sys.argv[1:] if argv is None else argv))  # the seed's spellings (004)
        options = build_parser().parse_args(argv)
        settings = imo_train.resolve_settings(vars(options))
        env = resolve_distributed(settings.device)
        announce_device(settings.device, env.device)
        result = imo_train.run(settings, env)
        if env.is_main:
            print(imo_train.describe(result))
        return 0
    except UserError as exc:
        print(f"mtil.imo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the file system refuses (too long, read-only, a file for a folder): one line
        error = path_error(exc)
        if error is None:
            raise
        print(f"mtil.imo: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtil.imo: interrupted (imo_adapter.pt holds the last finished epoch, if any)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
