"""Every command-line flag of mtil, grouped as in ARGUMENTS.md (which is generated from this file).

The core groups live here; each method and component adds its own group from its own file (see
:mod:`mtil.registry`). Multi-word flags accept both spellings (``--image-loss`` and ``--image_loss``): the seed's
README and its code disagreed, and researchers' scripts use both.

Where a value comes from: the command line wins over ``--config FILE.yaml``, which wins over the defaults. The
parsed namespace carries private entries (never saved as settings): ``_cli`` and ``_file`` (the flags the
command line and the config file set), ``_defaults`` (every flag's default), ``_argv`` (the command line) and
``_roles`` (role -> the flags declared with it, see :mod:`mtil.flags`).

The flag primitives (``add_flag``, ``Switch``, the typed validators) live in :mod:`mtil.flags` and are re-exported
here; ARGUMENTS.md is written by :mod:`mtil.arguments_doc`.
"""
from __future__ import annotations

import argparse
import difflib
import string
import sys
from pathlib import Path
from typing import Any, Sequence

from mtil.errors import UserError
from mtil.evaluation.label_space import DEFAULT_LABEL_SPACE, LABEL_SPACES, SEEN
from mtil.flags import (  # noqa: F401 - the flag primitives, re-exported for `from mtil.args import ...`
    INT_MAX, INTEGER_TYPES, LR_PARTS, MAX_WORKERS, ROLES, Switch, _checked, _OneLineParser, _spellings, add_flag,
    dropout, energy_fraction, flags_with_role, half_open_unit, label_smoothing, lr_multipliers, name_list,
    non_negative_float, non_negative_int, open_unit_interval, positive_float, positive_int, roles_of, seed_int,
    seed_list, unit_interval, worker_count)
from mtil.yaml_files import read_yaml

# Flags that only shape optimisation: they do nothing under --eval-only or for a training-free method.
OPTIMISATION_FLAGS = ("iterations", "epochs", "batch_size", "optimizer", "lr", "momentum", "wd", "beta2", "ls",
                      "warmup_length", "lr_multipliers", "freeze")


def build_parser() -> argparse.ArgumentParser:
    from mtil import registry
    from mtil.models.train_modes import TRAIN_MODES

    parser = _OneLineParser(
        prog="python -m mtil.main",
        description="Continual learning and adaptation of CLIP models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a prefix such as --conf would be a silent alias today and ambiguous tomorrow
    )

    g = parser.add_argument_group("Model", "Which CLIP to use and where its weights are.")
    add_flag(g, "--model", role="model", default="ViT-B/16",
             help="OpenAI CLIP name (RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32, ViT-B/16, ViT-L/14, "
                  "ViT-L/14@336px), toyclip (the built-in benchmark's pre-trained tiny CLIP, shipped with mtil), a "
                  "tiny test architecture (tiny-vit, tiny-rn, micro-vit; random weights), an open_clip model "
                  "open_clip:ARCH[/PRETRAINED] (e.g. open_clip:ViT-B-16/laion2b_s34b_b88k, "
                  "open_clip:ViT-B-16-SigLIP/webli; open_clip:mtil-tiny-vit, open_clip:mtil-tiny-siglip for tests; "
                  "weights from --clip-root or the Hugging Face cache: docs/models.md), or a path to a weights file.")
    add_flag(g, "--clip-root", role="operational", default="clip", path=True,
             help="Folder holding the OpenAI CLIP weight files (downloads go here when the network allows) and "
                  "open_clip weights under open_clip/<hub repo id>/.")
    add_flag(g, "--untrained", action="store_true",
             help="Build the named architecture with random weights instead of loading weights.")
    add_flag(g, "--load", default=None, path=True,
             help="Weights to start from: an mtil checkpoint, an OpenAI CLIP file, or an original ZSCL "
                  "checkpoint ({'state_dict': ...}, with or without a 'module.' prefix).")

    g = parser.add_argument_group("Hardware", "Where and how fast it runs. --device and --threads never change "
                                              "what a run computes; --precision does.")
    add_flag(g, "--device", role="operational", default="auto",
             help="auto (CUDA when available, else CPU, with a warning), cpu, cuda or cuda:N.")
    add_flag(g, "--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
             help="Arithmetic of the forward passes (autocast; fp16 adds a gradient scaler). auto: bf16 on a GPU "
                  "that supports it, else fp32 (always fp32 on CPU); a run records the resolved one. Weights, "
                  "losses and weight averages stay fp32.")
    add_flag(g, "--threads", role="operational", type=positive_int, default=None,
             help="CPU threads of torch (default: the CPUs this process may use, capped by SLURM_CPUS_PER_TASK; "
                  "OMP_NUM_THREADS, when set, is respected).")
    add_flag(g, "--workers", role="operational", type=worker_count, default=2,
             help=f"DataLoader worker processes (0 loads in the main process; at most {MAX_WORKERS}).")

    g = parser.add_argument_group("Data", "Where datasets live and how they are read.")
    add_flag(g, "--data-location", role="operational", default="data", path=True, help="Root folder of all datasets.")
    add_flag(g, "--download", role="operational", action="store_true",
             help="Allow torchvision to download datasets that are missing (nothing is downloaded otherwise).")
    add_flag(g, "--seed", type=seed_int, default=0, help="Seed for Python, NumPy and torch, and for sampled subsets.")

    g = parser.add_argument_group("Training", "What to train, how long, with which optimiser.")
    methods = registry.registered("method")
    add_flag(g, "--method", role="shapes_optimizer", default="finetune", choices=registry.method_names(),
             metavar="NAME",
             help="Training method: " + "; ".join(f"{n}: {methods[n].summary}" for n in registry.method_names())
                  + ".")
    add_flag(g, "--train-mode", role="shapes_optimizer", default="whole", choices=list(TRAIN_MODES),
             help="Which parts of CLIP train (docs/methods/finetune.md).")
    add_flag(g, "--train-dataset", role="dataset", default=None,
             help="Comma-separated datasets trained in order, or a named order: MTIL-I, MTIL-II, ToyWorld.")
    add_flag(g, "--sequence", default=None, metavar="YAML", path=True,
             help="Sequence file: a list of tasks with per-task settings (lr, iterations, epochs, batch_size, ...).")
    add_flag(g, "--iterations", type=positive_int, default=None, help="Optimiser steps per task (exactly this many).")
    add_flag(g, "--epochs", type=positive_int, default=None, help="Epochs per task instead of --iterations.")
    add_flag(g, "--batch-size", type=positive_int, default=64, help="Training batch size.")
    add_flag(g, "--optimizer", role="shapes_optimizer", default="adamw", choices=["adamw", "sgd"],
             help="adamw (betas 0.9, --beta2; decoupled --wd) or sgd (--momentum; --wd as L2 in the gradient). "
                  "OGD's own paper uses plain SGD, where the update itself is orthogonal to the stored basis.")
    add_flag(g, "--lr", type=positive_float, default=1e-5,
             help="Peak learning rate. Typed here (or in --config), it wins over a named order's per-task lr.")
    add_flag(g, "--momentum", type=half_open_unit, default=0.0, help="SGD momentum (--optimizer sgd).")
    add_flag(g, "--wd", type=non_negative_float, default=0.0, help="Weight decay.")
    add_flag(g, "--beta2", type=half_open_unit, default=0.999, help="AdamW beta2, in [0, 1).")
    add_flag(g, "--ls", type=label_smoothing, default=0.0, help="Label smoothing of the cross-entropy.")
    add_flag(g, "--warmup-length", type=non_negative_int, default=100,
             help="Linear warm-up steps, then cosine decay to 0. Left at its default, a task's warm-up is cut to a "
                  "tenth of its steps (with a note), so a short task reaches --lr; a value you give is kept.")
    add_flag(g, "--lr-multipliers", role="shapes_optimizer", type=lr_multipliers, default={}, metavar="PART=X,...",
             help="Per-part learning-rate factors, parts image (visual.*), text (the rest of CLIP) and head (a "
                  "linear head), e.g. 'text=0.1,head=10'; unnamed parts keep factor 1.")
    add_flag(g, "--freeze", role="shapes_optimizer", type=name_list, default=None, metavar="PATTERNS",
             help="Comma-separated parameter-name patterns (fnmatch, e.g. 'visual.conv1.*,token_embedding.*') "
                  "kept frozen on top of --train-mode.")
    add_flag(g, "--deterministic", action="store_true",
             help="Bitwise-reproducible kernels (torch.use_deterministic_algorithms; no TF32); slower on GPU.")
    add_flag(g, "--log-every", role="operational", type=non_negative_int, default=50,
             help="Print a progress line (loss terms, lr, images/s, ETA) every N steps, also when stdout is not a "
                  "terminal, e.g. in a SLURM log (0: never).")

    g = parser.add_argument_group(
        "Few-shot", "The few-shot protocol of the CoOp lineage on any dataset, and runs over several seeds "
                    "(docs/guides/few-shot.md). Reference data (--ref-dataset) is never subsampled.")
    add_flag(g, "--shots", type=positive_int, default=None, metavar="K",
             help="Train on K images per class of each training dataset, drawn with --fewshot-seed from its "
                  "training split (labels only, balanced); min(K, 4) more per class, disjoint from them, are the "
                  "validation images, evaluated after each task beside the test split (fewshot.csv). A class with "
                  "fewer images is an error.")
    add_flag(g, "--fewshot-seed", type=seed_int, default=1,
             help="Seed of the --shots draw (the papers report seeds 1, 2, 3); --seed still seeds the training.")
    add_flag(g, "--base-new", action="store_true",
             help="Base-to-new generalisation: train on the first half of each dataset's classes (base, as CoOp); "
                  "evaluate every dataset on its base and on its new classes, each among its own half's prompts, "
                  "and their harmonic mean HM = 2BN/(B+N) (fewshot.csv; the accuracy matrix holds base).")
    add_flag(g, "--seeds", type=seed_list, default=None, metavar="S1,S2,...",
             help="Run this command once per seed S, with --seed S and --fewshot-seed S (only --seed without "
                  "--shots), into <save>/seed<S>/, one after the other (a finished seed is skipped, an interrupted "
                  "one resumes); then print and write the mean ± std over the seeds per dataset "
                  "(<save>/seeds_results.csv, seeds_summary.csv, seeds_summary.md).")

    owners = registry.add_arguments(parser)

    g = parser.add_argument_group("Checkpoints", "Saving, resuming and preemption.")
    add_flag(g, "--checkpoint-interval", role="operational", type=non_negative_int, default=500,
             help="Write the resumable latest checkpoint every N steps (0: only at task ends).")
    add_flag(g, "--keep-checkpoints", role="operational", choices=("all", "last", "none"), default="all",
             help="Per-task checkpoints <save>/<Dataset>.pth: all (one per task), last (each new one replaces the "
                  "previous task's, after it is written) or none (latest.pth alone holds the run; a chain of "
                  "one-task runs needs all or last, since each link loads the previous link's).")
    add_flag(g, "--skip-nonfinite", role="operational", type=non_negative_int, default=0, metavar="N",
             help="A step whose loss or gradients are NaN or infinite stops the run (exit code 2; the checkpoints "
                  "already written are kept). With N > 0, up to N such steps in the run are skipped instead (no "
                  "weight update, a warning in the log). May differ on resume, so a stopped run can go on with it.")
    add_flag(g, "--force-resume", role="operational", action="store_true",
             help="Resume an unfinished run in --save even though its configuration differs from this command's.")
    add_flag(g, "--summarize", role="operational", default=None, metavar="DIR", path=True,
             help="Build accuracy_matrix.csv, summary.csv and the heat map from the results a run (or a chain of "
                  "one-task runs) left in DIR, and exit.")

    g = parser.add_argument_group("Evaluation", "Zero-shot evaluation and metric files.")
    add_flag(g, "--eval-datasets", role="dataset", type=name_list, default=None,
             help="Comma-separated datasets to evaluate (default: the training sequence; for --eval-only the "
                  "built-in benchmark's tasks).")
    add_flag(g, "--eval-only", role="operational", action="store_true",
             help="Evaluate the model and exit, no training.")
    add_flag(g, "--eval-single", role="operational", default=None, metavar="IMAGE", path=True,
             help="Classify one image against --class-names and print the ranked probabilities.")
    add_flag(g, "--class-names", role="operational", default=None, metavar="FILE", path=True,
             help="Text file with one class name per line (for --eval-single).")
    add_flag(g, "--prompt", role="operational", default="a photo of a {}.",
             help="Prompt template for --eval-single; '{}' is replaced by the class name.")
    add_flag(g, "--batch-size-eval", role="operational", type=positive_int, default=128,
             help="Batch size for evaluation.")
    add_flag(g, "--wise-ft", action="store_true",
             help="With --eval-only --load CKPT: evaluate alpha * checkpoint + (1 - alpha) * zero-shot weights.")
    add_flag(g, "--alpha", type=unit_interval, default=0.5, help="alpha of --wise-ft.")
    add_flag(g, "--eval-interval", type=positive_int, default=None,
             help="Also evaluate every N steps within a task (rows with after_task empty in results.jsonl).")
    add_flag(g, "--report", role="operational", action="store_true",
             help="Write classification reports (top-1/3/5, macro and weighted precision / recall / F1, per-class "
                  "table, confusion matrix as CSV and PNG) of the last evaluation of every dataset, and of the "
                  "zero-shot one with a baseline-vs-final chart, under <save>/reports/<Dataset>/.")
    add_flag(g, "--max-evaluation-size", type=positive_int, default=None,
             help="Evaluate on a seeded, class-balanced sample of at most this many test images.")
    add_flag(g, "--eval-sample-seed", type=seed_int, default=None, metavar="S",
             help="Seed of --max-evaluation-size's sample (default: --seed). --seeds gives every run the first "
                  "seed's sample, so the spread over seeds is the training's, not the sample's.")
    add_flag(g, "--label-space", choices=list(LABEL_SPACES), default=DEFAULT_LABEL_SPACE,
             help="Among which classes a test image is classified. dataset (MTIL's): each test set among its own "
                  "classes. seen (task-agnostic, X-TAIL's): an image of dataset D among the classes of every task "
                  "trained so far plus D's own, each dataset's classes their own slots (a same-named class of two "
                  "datasets is two slots; a hit is the true dataset's class); the zero-shot row and a task's "
                  "column after that task alone equal dataset's. The matrix, Transfer/Avg/Last and results.jsonl "
                  "(label_space) follow it. With --eval-only: the tasks the --load checkpoint trained, rows in "
                  "metrics_<Dataset>_seen.csv. Not with --report, --base-new, or methods whose heads cannot be set "
                  "side by side (Tip-Adapter, embedding adapter) (docs/guides/evaluation.md).")
    add_flag(g, "--save", role="operational", default=None, metavar="DIR", path=True,
             help="Directory for checkpoints (<Dataset>.pth, latest.pth), metric files (metrics_<Dataset>.csv, "
                  "results.jsonl, accuracy_matrix.csv, summary.csv) and config.yaml. Re-running a command resumes "
                  "from here.")

    g = parser.add_argument_group("Tracking", "Trackers that watch a run beside its metric files "
                                              "(docs/records.md).")
    add_flag(g, "--report-to", role="operational", type=name_list, default=None, metavar="TRACKERS",
             help="Comma-separated trackers that get every training scalar (each loss term, lr, images/s, every "
                  "--log-every steps), every evaluation (eval/<Dataset>/top1, top5), the accuracy matrix and its "
                  "heat map, and Transfer/Avg/Last: tensorboard (event files in <save>/tensorboard) and wandb "
                  "(Weights & Biases; WANDB_MODE=offline and the other WANDB_* variables apply). A resumed run "
                  "continues the same tracker run. Needs --save; only rank 0 reports. Install with "
                  "pip install 'mtil[trackers]'.")

    g = parser.add_argument_group("Configuration", "Settings from a file.")
    add_flag(g, "--config", role="operational", default=None, metavar="YAML", path=True,
             help="YAML file of flag: value pairs (either spelling, without dashes), e.g. a run's config.yaml; "
                  "the command line wins over the file, the file over the defaults.")
    parser.flag_owners = owners
    return parser


# ---------------------------------------------------------------------------------------------- config files
def _config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (either spelling, ``--config=X`` too), without full parsing."""
    path = None
    for i, token in enumerate(argv):
        if token in ("--config",) and i + 1 < len(argv):
            path = argv[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    return path


def config_file_tokens(path: str, parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> list[str]:
    """A ``--config`` YAML file as command-line tokens (so the flags' own checks apply to its values), leaving out
    the settings in ``skip`` (those the command line decides)."""
    document = read_yaml(path, "--config")
    if document is None:
        return []
    if not isinstance(document, dict):
        raise UserError(f"--config {path} must map flag names to values (e.g. 'lr: 1.0e-5'), "
                        f"found {type(document).__name__}")
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    tokens: list[str] = []
    skip = set(skip)
    for key, value in document.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = by_dest.get(dest)
        if action is None or dest == "config":
            close = difflib.get_close_matches(dest, list(by_dest), n=1)
            raise UserError(f"--config {path}: unknown setting {key!r}"
                            + (f" (did you mean {close[0]}?)" if close else "") + "; settings are flag names")
        flag = action.option_strings[0]
        if value is None or dest in skip:
            continue
        if isinstance(action, Switch):
            if not isinstance(value, bool):
                raise UserError(f"--config {path}: {key} takes true or false, got {value!r}")
            tokens.append(flag if value else "--no-" + flag[2:])
            continue
        if isinstance(value, bool):
            raise UserError(f"--config {path}: {key} takes a value, got {value!r}")
        if isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, float) and value.is_integer() and action.type in INTEGER_TYPES:
            value = int(value)  # YAML's 4.0 for an integer flag
        tokens.append(f"{flag}={value}")  # one token: a value starting with '-' is not taken for a flag
    return tokens


# Settings of which only one may be given: the command line's choice replaces the file's other one.
EITHER_OR = ({"iterations", "epochs"}, {"train_dataset", "sequence"})


def _given(parser: argparse.ArgumentParser, tokens: list[str]) -> set[str]:
    """The dests ``tokens`` set (argparse leaves pre-set namespace entries alone unless a flag sets them)."""
    sentinel = object()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    namespace = argparse.Namespace(**{d: sentinel for d in dests})
    parsed = parser.parse_args(tokens, namespace=namespace)
    return {d for d in dests if getattr(parsed, d) is not sentinel}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags (and ``--config``), run every check that needs no files, resolve defaults that depend on
    others. Raises UserError (one line) on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cli = _given(parser, argv)
    path = _config_path(argv)
    file_tokens: list[str] = []
    if path is not None:
        decided = set(cli) | {d for pair in EITHER_OR if pair & cli for d in pair}
        file_tokens = config_file_tokens(path, parser, skip=decided)
        try:
            parser.parse_args(file_tokens)
        except UserError as exc:
            raise UserError(f"--config {path}: {exc}") from None
    args = parser.parse_args(file_tokens + argv)
    args._cli = sorted(cli)
    args._argv = list(argv)  # the command line as typed (--seeds re-runs it once per seed)
    args._file = sorted(_given(parser, file_tokens) - cli) if file_tokens else []
    args._defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    args._roles = roles_of(parser)
    _validate(args, parser)
    return args


def evaluation_sample_seed(args: argparse.Namespace) -> int:
    """The seed of the evaluation sample: --eval-sample-seed, else --seed."""
    return args.seed if getattr(args, "eval_sample_seed", None) is None else args.eval_sample_seed


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of a parsed namespace, without its bookkeeping entries (names starting with '_')."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    return next(a.option_strings[0] for a in parser._actions if a.dest == dest)


def _changed(args: argparse.Namespace, dest: str) -> bool:
    return getattr(args, dest) != args._defaults.get(dest)


# Evaluation flags that --eval-single (one image, printed) does not use.
NOT_FOR_ONE_IMAGE = ("save", "eval_datasets", "max_evaluation_size", "batch_size_eval", "eval_interval",
                     "report", "label_space")


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every check that needs no files. Refuses (UserError) what cannot work and what would do nothing; a setting
    from --config that would do nothing is a note. Records ``_unused``: the flags no active method or component
    reads (resume ignores their values)."""
    from mtil import registry

    owners: dict[str, type] = parser.flag_owners
    cli, from_file = set(args._cli), set(args._file)
    notes: list[str] = []

    def inert(dests, why: str) -> None:
        """Flags of ``dests`` set away from their default do nothing here: typed, an error; from --config, a note."""
        typed = [_flag(parser, d) for d in dests if d in cli and _changed(args, d)]
        if typed:
            pronoun = "it" if len(typed) == 1 else "them"
            raise UserError(f"{why}, so {', '.join(typed)} would do nothing: drop {pronoun}")
        notes.extend(f"--config sets {d}, which this command does not use (ignored)" for d in dests
                     if d in from_file and _changed(args, d))

    if args.iterations is not None and args.epochs is not None:
        raise UserError("--iterations and --epochs contradict each other: give one of them")
    if args.save and Path(args.save).exists() and not Path(args.save).is_dir():
        raise UserError(f"--save {args.save} is a file, not a folder: give a folder (it is created when missing)")
    if args.untrained and args.load:
        raise UserError("--untrained builds random weights and --load reads weights: give one of them")
    if args.wise_ft and not args.load:
        raise UserError("--wise-ft blends a fine-tuned checkpoint with zero-shot weights: give --load CKPT")
    if args.alpha != args._defaults["alpha"] and not args.wise_ft:
        raise UserError("--alpha is the blend of --wise-ft: give --wise-ft too (or drop --alpha)")
    training_flags = ["train_dataset", "sequence", "method", *OPTIMISATION_FLAGS, "train_mode", *FEWSHOT_FLAGS,
                      *owners]
    evaluating = args.eval_only or args.eval_single
    if evaluating:
        mode = "--eval-single" if args.eval_single else "--eval-only"
        if args.base_new and "base_new" in cli:
            raise UserError(f"--base-new measures a training run's base and new classes, not {mode}: for the "
                            f"zero-shot model's base, new and HM run --method zeroshot --train-dataset NAME --base-new")
        inert(training_flags, f"{mode} evaluates without training (drop {mode} to train)")
        if args.eval_single:
            inert(NOT_FOR_ONE_IMAGE, "--eval-single classifies one image and prints the ranking")
        args._unused = sorted(owners)
    else:
        if args.wise_ft:
            raise UserError("--wise-ft blends a checkpoint at evaluation: use it with --eval-only (after each task "
                            "of a training run, --wise-merge does the blend)")
        if args.train_dataset and args.sequence:
            raise UserError("--train-dataset and --sequence both name the tasks: give one of them")
        method = registry.method_class(args.method)
        if method.training_free:
            inert((*OPTIMISATION_FLAGS, "train_mode", "eval_interval", "checkpoint_interval"),
                  f"--method {args.method} trains nothing (its tasks have zero steps)")
        if args.label_space == SEEN and method.label_space_seen_refused:
            raise UserError(f"--label-space seen: --method {args.method} {method.label_space_seen_refused}")
        _check_optimizer_flags(args, cli, parser)
        _check_fewshot_flags(args, cli, method)
        if args.shots is None:
            inert(["fewshot_seed"], "--fewshot-seed seeds the draw of --shots, which is not given")
        from mtil.distributed import launched_world_size  # the one reading of torchrun's / srun's variables

        registry.check_combination(args, world_size=launched_world_size())
        for dest, owner in registry.inert_flags(args, owners, args._defaults):
            message = registry.inert_message(_flag(parser, dest), owner, args)
            if dest in cli:
                raise UserError(message)
            notes.append(f"--config sets {dest}, which this run does not use (ignored): {message}")
        args._unused = sorted(registry.inactive_flags(args, owners))
        if not (args.train_dataset or args.sequence) and not args.summarize:
            inert(training_flags, "no --train-dataset or --sequence: nothing to train (give the tasks, e.g. "
                                  "--train-dataset DTD or MTIL-I, or --eval-only to evaluate)")
    if args.max_evaluation_size is None:
        inert(["eval_sample_seed"], "--eval-sample-seed seeds the sample of --max-evaluation-size, which is not given")
    if not is_template(args.prompt):
        raise UserError(f"--prompt must contain '{{}}' exactly once (where the class name goes) and no other "
                        f"braces, got {args.prompt!r}")
    if not args.eval_single:  # an image folder's names come from its own classnames.txt
        inert(["class_names", "prompt"], "--class-names and --prompt name the classes of --eval-single's image")
    for note in notes:
        print(f"mtil: note: {note}", file=sys.stderr)
    if args.report and not args.eval_single and (args.summarize or not args.save):
        raise UserError("--report writes classification reports of the evaluations under --save DIR/reports: "
                        + ("--summarize evaluates nothing (drop --report)" if args.summarize else "give --save DIR"))
    if args.label_space == SEEN and not args.eval_single:
        _check_seen_label_space(args)
    if args.report_to:
        _check_report_to(args)
    if args.eval_single and not args.class_names:
        raise UserError("--eval-single needs --class-names FILE (one class name per line)")


def _check_seen_label_space(args: argparse.Namespace) -> None:
    """--label-space seen: refuse the flags that measure a dataset among its own classes only."""
    if args.report:
        raise UserError("--report describes each dataset among its own classes (per-class table, confusion "
                        "matrix), --label-space seen ranks among every seen task's classes: drop one of them")
    if args.base_new:
        raise UserError("--base-new ranks each dataset among its own half of the classes, --label-space seen among "
                        "every seen task's classes: drop one of them")


def _check_report_to(args: argparse.Namespace) -> None:
    """--report-to: known trackers, each installed and usable, and a folder to report from."""
    from mtil.records.sink import check_report_to

    if args.eval_single or args.summarize:
        used = "--eval-single" if args.eval_single else "--summarize"
        raise UserError(f"--report-to reports a run's training and evaluations; {used} has none (drop --report-to)")
    if not args.save:
        raise UserError("--report-to needs --save DIR: the trackers' files and run ids live in the run's folder")
    if len(set(args.report_to)) != len(args.report_to):
        raise UserError(f"--report-to names a tracker twice: {','.join(args.report_to)}")
    check_report_to(args.report_to)


FEWSHOT_FLAGS = ("shots", "fewshot_seed", "base_new", "seeds")


def _check_fewshot_flags(args: argparse.Namespace, cli: set[str], method: type) -> None:
    """--shots / --base-new against the method and train mode; --seeds against the flags it sets itself."""
    from mtil.models.train_modes import LINEAR_HEAD_MODES

    if (args.shots is not None or args.base_new) and not method.needs_classification_data:
        used = "--shots" if args.shots is not None else "--base-new"
        raise UserError(f"{used} draws images per class of a classification dataset, but --method {args.method} "
                        f"trains on captions")
    if args.base_new and args.train_mode in LINEAR_HEAD_MODES:
        raise UserError(f"--base-new evaluates classes that were never trained, which the linear head of "
                        f"--train-mode {args.train_mode} cannot classify: use a train mode without a head "
                        f"(whole, image, text)")
    if args.seeds is None:
        return
    if "seeds" in set(args._file):
        raise UserError("--seeds runs the command once per seed: give it on the command line, not in --config")
    if not args.save:
        raise UserError("--seeds writes each seed's run to <save>/seed<S>/: give --save DIR")
    if args.summarize:
        raise UserError("--seeds runs training; --summarize reads one folder: give one of them")
    typed = [f"--{d.replace('_', '-')}" for d in ("seed", "fewshot_seed") if d in cli]
    if typed:
        sets = "--seed and --fewshot-seed" if args.shots is not None else "--seed"
        raise UserError(f"--seeds sets each run's {sets}: drop {', '.join(typed)}")


def _check_optimizer_flags(args: argparse.Namespace, cli: set[str], parser) -> None:
    foreign = {"adamw": ["momentum"], "sgd": ["beta2"]}[args.optimizer]
    for dest in foreign:
        if _changed(args, dest) and dest in cli:
            other = "sgd" if args.optimizer == "adamw" else "adamw"
            raise UserError(f"{_flag(parser, dest)} belongs to --optimizer {other}, but this run uses "
                            f"--optimizer {args.optimizer}: drop {_flag(parser, dest)} or change the optimiser")
    if "head" in args.lr_multipliers and args.train_mode not in ("image-fc", "fc"):
        raise UserError(f"--lr-multipliers head=...: --train-mode {args.train_mode} trains no linear head "
                        f"(image-fc and fc do)")


def is_template(text: str) -> bool:
    """True when ``text.format(name)`` works and inserts ``name`` exactly once."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError:
        return False
    return fields == [""]


def path_flags(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """Dests of the flags that name files or folders (role ``path``; a parsed namespace has them in ``_roles``)."""
    return set(roles_of(parser or build_parser())["path"])


def setting_types(parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """dest -> the flag's argparse type (its validator), for values that arrive from files."""
    parser = parser or build_parser()
    return {a.dest: a.type for a in parser._actions if a.dest != "help"}


if __name__ == "__main__":  # the older spelling of `python -m mtil.arguments_doc`, kept for scripts
    from mtil.arguments_doc import main

    main()
