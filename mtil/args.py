"""Every command-line flag of mtil, grouped as in ARGUMENTS.md (which is generated from this file).

Multi-word flags accept both spellings (``--image-loss`` and ``--image_loss``): the seed's README and its code
disagreed, and researchers' scripts use both.
"""
from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path
from typing import Sequence

from mtil.errors import UserError


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as one line (``mtil: error: ...``) with exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise UserError(f"{message} (see --help)")


def _spellings(flag: str) -> list[str]:
    """``--image-loss`` -> ``['--image-loss', '--image_loss']``; single words give one spelling."""
    body = flag[2:]
    variants = [flag]
    for a, b in (("-", "_"), ("_", "-")):
        other = "--" + body.replace(a, b)
        if other not in variants:
            variants.append(other)
    return variants


def _add(group, flag: str, *extra: str, **kwargs) -> None:
    names: list[str] = []
    for f in (flag, *extra):
        names += [n for n in _spellings(f) if n not in names]
    kwargs.setdefault("dest", flag[2:].replace("-", "_"))
    group.add_argument(*names, **kwargs)


def _checked(convert, accept, requirement: str, name: str):
    """An argparse type: ``convert`` the text, then require ``accept(value)`` (argparse reports the flag)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer", "positive_int")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer of 0 or more", "non_negative_int")
positive_float = _checked(float, lambda v: v > 0, "a positive number", "positive_float")
non_negative_float = _checked(float, lambda v: v >= 0, "a number of 0 or more", "non_negative_float")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]", "unit_interval")
open_unit_interval = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1), e.g. 0.999", "open_unit_interval")
label_smoothing = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)", "label_smoothing")
dropout = label_smoothing
energy_fraction = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]", "energy_fraction")


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m mtil.main",
        description="Continual learning and adaptation of CLIP models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    g = parser.add_argument_group("Model", "Which CLIP to use and where its weights are.")
    _add(g, "--model", default="ViT-B/16",
         help="OpenAI CLIP name (RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32, ViT-B/16, ViT-L/14, "
              "ViT-L/14@336px), a tiny test architecture (tiny-vit, tiny-rn, micro-vit), or a path to a weights file.")
    _add(g, "--clip-root", default="clip",
         help="Folder holding the OpenAI CLIP weight files; downloads go here when the network allows.")
    _add(g, "--untrained", action="store_true",
         help="Build the named architecture with random weights instead of loading weights.")
    _add(g, "--load", default=None,
         help="Weights to start from: an mtil checkpoint, an OpenAI CLIP file, or an original ZSCL "
              "checkpoint ({'state_dict': ...}, with or without a 'module.' prefix).")
    _add(g, "--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")

    g = parser.add_argument_group("Data", "Where datasets live and how they are read.")
    _add(g, "--data-location", default="data", help="Root folder of all datasets.")
    _add(g, "--download", action="store_true",
         help="Allow torchvision to download datasets that are missing (nothing is downloaded otherwise).")
    _add(g, "--workers", type=non_negative_int, default=2, help="DataLoader worker processes (0 loads in the main process).")
    _add(g, "--seed", type=int, default=0, help="Seed for Python, NumPy and torch, and for sampled subsets.")

    g = parser.add_argument_group("Training", "What to train, how long, with which optimiser.")
    _add(g, "--method", default="finetune",
         help="Training method: finetune, lwf, lwf-vr, ZSCL, icarl, or contrastive (CLIP's image-text loss on a "
              "caption dataset, e.g. for pre-training).")
    _add(g, "--train-mode", default="whole",
         choices=["whole", "image", "text", "image-fc", "image-fc-fixed", "fc"],
         help="Which parts of CLIP train (see README: Train modes).")
    _add(g, "--train-dataset", default=None,
         help="Comma-separated datasets trained in order, or a named order: MTIL-I, MTIL-II, ToyWorld.")
    _add(g, "--sequence", default=None, metavar="YAML",
         help="Sequence file: a list of tasks with per-task settings (lr, iterations, epochs, batch_size, ...).")
    _add(g, "--iterations", type=positive_int, default=None, help="Optimiser steps per task (exactly this many).")
    _add(g, "--epochs", type=positive_int, default=None, help="Epochs per task instead of --iterations.")
    _add(g, "--batch-size", type=positive_int, default=64, help="Training batch size.")
    _add(g, "--lr", type=positive_float, default=1e-5, help="Peak learning rate (AdamW).")
    _add(g, "--wd", type=non_negative_float, default=0.0, help="AdamW weight decay.")
    _add(g, "--beta2", type=float, default=0.999, help="AdamW beta2.")
    _add(g, "--ls", type=label_smoothing, default=0.0, help="Label smoothing of the cross-entropy.")
    _add(g, "--warmup-length", type=non_negative_int, default=100, help="Linear warm-up steps, then cosine decay to 0.")
    _add(g, "--freeze", type=_name_list, default=None, metavar="PATTERNS",
         help="Comma-separated parameter-name patterns (fnmatch, e.g. 'visual.conv1.*,token_embedding.*') "
              "kept frozen on top of --train-mode.")
    _add(g, "--deterministic", action="store_true",
         help="Bitwise-reproducible kernels (torch.use_deterministic_algorithms); slower on GPU.")

    g = parser.add_argument_group("Distillation (ZSCL, LwF, LwF-VR, iCaRL)",
                                  "Reference data and losses of the distillation methods.")
    _add(g, "--ref-dataset", default="ImageNet",
         help="ZSCL's reference images: any registered dataset (ImageNet, ImageNetSubset:N, ...) or ToyCaptions.")
    _add(g, "--ref-sentences", default="conceptual_captions",
         help="ZSCL's reference sentences: conceptual_captions, random (10-token random sequences), ToyCaptions, "
              "ref (the ref dataset's class prompts), or dataset:A,B (class prompts of named datasets).")
    _add(g, "--ref-sentences-count", type=positive_int, default=5000,
         help="How many random-token / ToyCaptions sentences to draw (random, ToyCaptions, lwf-vr).")
    _add(g, "--ref-batch-size", type=positive_int, default=None, help="Reference images per step (default: --batch-size).")
    _add(g, "--ref-model", default=None,
         help="ZSCL teacher weights (a file or model name) instead of the zero-shot model.")
    _add(g, "--ref-wise", action="store_true",
         help="ZSCL teacher = alpha * current + (1 - alpha) * zero-shot weights, rebuilt at each task start.")
    _add(g, "--ref-wise-alpha", type=unit_interval, default=0.8, help="alpha of --ref-wise.")
    _add(g, "--T", type=positive_float, default=2.0, dest="T", help="Distillation temperature.")
    _add(g, "--image-loss", action="store_true",
         help="Distil over sentences (softmax per reference image). Without --image-loss and --text-loss both are on.")
    _add(g, "--text-loss", action="store_true", help="Distil over reference images (softmax per sentence).")
    _add(g, "--feature-mse", action="store_true", help="Add MSE between student and teacher reference image features.")
    _add(g, "--image-image-loss", action="store_true",
         help="Ablation: distil image-image similarities of the reference batch (diagonal masked).")
    _add(g, "--weight-adjust", action="store_true", help="Halve the weights of the distillation terms.")
    _add(g, "--memory-size", type=positive_int, default=2000, help="iCaRL: exemplars kept over all past tasks.")
    _add(g, "--icarl-teacher", default="previous", choices=["previous", "zeroshot"],
         help="iCaRL distillation teacher: the model from the end of the previous task, or the zero-shot model.")

    g = parser.add_argument_group("Weight averaging and consolidation", "Components that combine with any method.")
    _add(g, "--l2", type=non_negative_float, default=0.0, help="Weight of the L2 penalty to the task-start weights (0: off).")
    _add(g, "--we", action="store_true",
         help="Weight ensembling: average the weights every --avg-freq steps; the task's result is the average.")
    _add(g, "--avg-freq", type=positive_int, default=100, help="Steps between weight-ensembling updates.")
    _add(g, "--we-wise", action="store_true",
         help="With --we: the result is alpha * average + (1 - alpha) * task-start weights.")
    _add(g, "--we-wise-alpha", type=unit_interval, default=0.98, help="alpha of --we-wise.")
    _add(g, "--ema", type=open_unit_interval, default=None, metavar="DECAY",
         help="Exponential moving average of the weights with this decay (e.g. 0.999); the task's result is the EMA.")
    _add(g, "--wise-merge", action="store_true",
         help="WiSE-FT after each task: weights = alpha * trained + (1 - alpha) * reference (--wise-ref).")
    _add(g, "--wise-ft-alpha", type=unit_interval, default=0.8, help="alpha of --wise-merge.")
    _add(g, "--wise-ref", default="zeroshot", choices=["zeroshot", "start"],
         help="Reference weights of --wise-merge: the zero-shot model or the task-start weights.")

    g = parser.add_argument_group(
        "Orthogonal gradients (OGD)",
        "Project each task's gradients off the directions earlier tasks' gradients spanned (see mtil/methods/ogd.py).")
    _add(g, "--orthogonal-gradients", type=positive_int, default=None, metavar="N",
         help="Record the tracked weights' gradients at N evenly spaced steps of each task; at the task's end keep "
              "their orthonormal basis (merged with earlier tasks', written to grad_<Dataset>.pth in --save) and "
              "project every later task's gradients off it.")
    _add(g, "--orthogonal-gradients-path", default=None, metavar="FILE",
         help="Start from this basis file (a previous process's grad_<Dataset>.pth) to continue a chain of "
              "one-task runs; needs --orthogonal-gradients.")
    _add(g, "--ogd-energy", type=energy_fraction, default=0.97,
         help="Keep the leading singular directions of a task's gradients that hold this fraction of their energy.")
    _add(g, "--ogd-params", type=_name_list, default=["*attn.in_proj_weight", "*attn.out_proj.weight",
                                                     "*mlp.c_fc.weight", "*mlp.c_proj.weight"], metavar="PATTERNS",
         help="Comma-separated parameter-name patterns (fnmatch) of the tracked weights (trainable ones only).")
    _add(g, "--ogd-dtype", default="float32", choices=["float32", "float16"],
         help="Precision of the gradient snapshots kept on the CPU during a task (the basis is float32).")
    _add(g, "--ogd-save-raw", action="store_true",
         help="Also write each task's raw gradient snapshots to grad_raw_<Dataset>.pth "
              "(scripts/convert_grad_to_basis.py turns them into a basis).")

    g = parser.add_argument_group(
        "LoRA", "Low-rank adapters (through peft) trained instead of CLIP's weights and merged into them at each "
                "task's end, so every task checkpoint holds a plain CLIP (see README: LoRA).")
    _add(g, "--lora", action="store_true",
         help="Train LoRA adapters on --lora-target-modules instead of CLIP's weights: fresh adapters at each task's "
              "start (B = 0: outputs unchanged), merged into the weights at its end. --train-mode picks which "
              "encoder's adapters train (image: image encoder only; image-fc: plus the head); not with fc.")
    _add(g, "--lora-r", type=positive_int, default=8, help="Rank r of every adapter.")
    _add(g, "--lora-alpha", type=positive_float, default=16, help="Adapter scaling: the update is (alpha / r) * B A.")
    _add(g, "--lora-dropout", type=dropout, default=0.0,
         help="Dropout on the input of the Linear (MLP) adapters (default 0; the seed used 0.1). Attention adapters act through "
              "the weights (peft's MultiheadAttention LoRA), which takes no dropout.")
    _add(g, "--lora-target-modules", type=_name_list, default="attn,mlp.c_fc,mlp.c_proj", metavar="NAMES",
         help="Comma-separated module names; a name matches every module called so or ending in '.NAME'. 'attn': "
              "q, k, v and o of every nn.MultiheadAttention (separate adapters on the packed in_proj and on "
              "out_proj); 'mlp.c_fc', 'mlp.c_proj': the MLP linears; both encoders. scripts/list_clip_layers.py "
              "lists the names a model accepts.")
    _add(g, "--lora-shared", action="store_true",
         help="Share adapters across layers: every adapter reuses the A and B of the first one with the same "
              "(encoder, layer type attn/mlp, shapes); attention never shares with MLP.")
    _add(g, "--lora-shared-split-qkvo", action="store_true",
         help="With --lora-shared: the projection (q, k, v, o) joins the sharing key, so q shares only with q, etc.")

    g = parser.add_argument_group("Checkpoints", "Saving, resuming and preemption.")
    _add(g, "--checkpoint-interval", type=non_negative_int, default=500,
         help="Write the resumable latest checkpoint every N steps (0: only at task ends).")
    _add(g, "--force-resume", action="store_true",
         help="Resume an unfinished run in --save even though its configuration differs from this command's.")
    _add(g, "--summarize", default=None, metavar="DIR",
         help="Build accuracy_matrix.csv, summary.csv and the heat map from the results a run (or a chain of "
              "one-task runs) left in DIR, and exit.")

    g = parser.add_argument_group("Evaluation", "Zero-shot evaluation and metric files.")
    _add(g, "--eval-datasets", type=_name_list, default=None,
         help="Comma-separated datasets to evaluate (default: the built-in benchmark's tasks).")
    _add(g, "--eval-only", action="store_true", help="Evaluate the model and exit, no training.")
    _add(g, "--eval-single", default=None, metavar="IMAGE",
         help="Classify one image against --class-names and print the ranked probabilities.")
    _add(g, "--class-names", default=None, metavar="FILE",
         help="Text file with one class name per line (for --eval-single).")
    _add(g, "--prompt", default="a photo of a {}.",
         help="Prompt template for --eval-single; '{}' is replaced by the class name.")
    _add(g, "--batch-size-eval", type=positive_int, default=128, help="Batch size for evaluation.")
    _add(g, "--wise-ft", action="store_true",
         help="With --eval-only --load CKPT: evaluate alpha * checkpoint + (1 - alpha) * zero-shot weights.")
    _add(g, "--alpha", type=unit_interval, default=0.5, help="alpha of --wise-ft.")
    _add(g, "--eval-interval", type=positive_int, default=None,
         help="Also evaluate every N steps within a task (rows with after_task empty in results.jsonl).")
    _add(g, "--max-evaluation-size", type=positive_int, default=None,
         help="Evaluate on a seeded, class-balanced sample of at most this many test images.")
    _add(g, "--save", default=None, metavar="DIR",
         help="Directory for checkpoints (<Dataset>.pth, latest.pth) and metric files (metrics_<Dataset>.csv, "
              "results.jsonl, accuracy_matrix.csv, summary.csv). Re-running a command resumes from here.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, check the combinations that argparse cannot express, resolve defaults that depend on others."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _validate(args)
    if not args.image_loss and not args.text_loss:  # neither named: both distillation directions, as in ZSCL
        args.image_loss = args.text_loss = True
    return args


def _validate(args: argparse.Namespace) -> None:
    if args.iterations is not None and args.epochs is not None:
        raise UserError("--iterations and --epochs contradict each other: give one of them")
    if args.we_wise and not args.we:
        raise UserError("--we-wise modifies weight ensembling: give --we too")
    if args.we and args.ema is not None:
        raise UserError("--we and --ema both average the weights: choose one")
    if args.wise_ft and not args.load:
        raise UserError("--wise-ft blends a fine-tuned checkpoint with zero-shot weights: give --load CKPT")
    if args.eval_only or args.eval_single:
        training = [flag for flag, given in (
            ("--train-dataset", args.train_dataset), ("--sequence", args.sequence), ("--lora", args.lora),
            ("--orthogonal-gradients", args.orthogonal_gradients is not None), ("--we", args.we),
            ("--ema", args.ema is not None), ("--wise-merge", args.wise_merge), ("--l2", args.l2 > 0),
            ("--method", args.method != "finetune")) if given]
        if training:
            mode = "--eval-only" if args.eval_only else "--eval-single"
            raise UserError(f"{mode} evaluates without training, so {', '.join(training)} would do nothing: drop "
                            f"{'it' if len(training) == 1 else 'them'} (or drop {mode} to train)")
    if args.train_dataset and args.sequence:
        raise UserError("--train-dataset and --sequence both name the tasks: give one of them")
    if not args.ogd_params:
        raise UserError("--ogd-params needs at least one parameter-name pattern")
    if args.orthogonal_gradients is None and (args.orthogonal_gradients_path or args.ogd_save_raw):
        flag = "--orthogonal-gradients-path" if args.orthogonal_gradients_path else "--ogd-save-raw"
        raise UserError(f"{flag} belongs to orthogonal gradient descent: give --orthogonal-gradients N too")
    if args.orthogonal_gradients_path and not Path(args.orthogonal_gradients_path).is_file():
        raise UserError(f"--orthogonal-gradients-path {args.orthogonal_gradients_path} does not exist")
    if not args.lora_target_modules:
        raise UserError("--lora-target-modules names no module (e.g. attn,mlp.c_fc,mlp.c_proj)")
    if args.lora_shared and not args.lora:
        raise UserError("--lora-shared shares LoRA adapters: give --lora too")
    if args.lora_shared_split_qkvo and not args.lora_shared:
        raise UserError("--lora-shared-split-qkvo refines --lora-shared: give --lora --lora-shared too")
    if args.lora and args.train_mode == "fc":
        raise UserError("--train-mode fc trains only a linear head on frozen features: --lora has nothing to adapt "
                        "(use image-fc to train image-encoder adapters and the head)")
    if args.eval_single and not args.class_names:
        raise UserError("--eval-single needs --class-names FILE (one class name per line)")
    if not is_template(args.prompt):
        raise UserError(f"--prompt must contain '{{}}' exactly once (where the class name goes) and no other "
                        f"braces, got {args.prompt!r}")


def is_template(text: str) -> bool:
    """True when ``text.format(name)`` works and inserts ``name`` exactly once."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError:
        return False
    return fields == [""]


def arguments_markdown() -> str:
    """ARGUMENTS.md, generated from the parser so the two cannot drift."""
    parser = build_parser()
    lines = [
        "# Arguments",
        "",
        "Generated from `mtil/args.py` by `python -m mtil.args > ARGUMENTS.md` "
        "(a test fails when this file and the parser differ).",
        "Multi-word flags accept hyphens or underscores (`--eval-only` or `--eval_only`).",
        "",
    ]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title}", ""]
        if group.description:
            lines += [group.description, ""]
        lines += ["| flag | default | description |", "| --- | --- | --- |"]
        for action in actions:
            names = ", ".join(f"`{n}`" for n in action.option_strings)
            default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
            text = (action.help or "").replace("|", "\\|")
            lines.append(f"| {names} | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(arguments_markdown(), end="")
