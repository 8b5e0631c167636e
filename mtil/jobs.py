"""The jobs ``main`` dispatches to. Each takes the parsed flags and returns an exit code."""
from __future__ import annotations

import argparse
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

from mtil.args import evaluation_sample_seed, settings_of
from mtil.datasets.registry import check_readable
from mtil.datasets.toyworld import BUILTIN_ORDER
from mtil.engine.checkpoint import config_for_checkpoint
from mtil.engine.precision import DTYPES, resolve_precision
from mtil.errors import UserError
from mtil.evaluation.label_space import DEFAULT_LABEL_SPACE, SEEN, records_label_space, seen_tasks, summary_label
from mtil.evaluation.single_image import classify_image, read_class_names, read_image
from mtil.evaluation.zeroshot import ZeroShotEvaluator, autocast_for
from mtil.flags import flags_with_role
from mtil.folder_lock import FolderLock, refuse_if_held
from mtil.hardware import announce_device, resolve_device
from mtil.models.clip_loading import LoadedModel, load_clip
from mtil.models.heads import head_from_state
from mtil.records import Records
from mtil.records.files import result_record
from mtil.seeding import seed_everything


def _load_model(args: argparse.Namespace) -> LoadedModel:
    return load_clip(args.model, clip_root=args.clip_root, untrained=args.untrained, load=args.load,
                     device=resolve_device(args.device), seed=args.seed,
                     name_given="model" in getattr(args, "_cli", ()))


def _model_name(args: argparse.Namespace, loaded: LoadedModel) -> str:
    """The model evaluated: ``--model`` as typed, else what a ``--load`` file holds (its run's ``--model`` when mtil
    wrote it), never the flag's default, which names a model that was not used."""
    if not args.load or "model" in getattr(args, "_cli", ()):
        return args.model
    recorded = (loaded.checkpoint.get("config") or {}).get("model")
    return recorded if isinstance(recorded, str) and recorded else f"file {args.load}"


def _resolved_config(args: argparse.Namespace, loaded: LoadedModel) -> dict:
    record = config_for_checkpoint(settings_of(args), roles=args._roles)
    return {**record, "model": _model_name(args, loaded), "model_source": loaded.source,
            "device": str(next(loaded.model.parameters()).device)}


def _learned_heads(loaded: LoadedModel, device) -> dict:
    """Heads a checkpoint learned in training (image-fc / fc): they classify their datasets here too."""
    heads = {}
    for name, entry in (loaded.checkpoint.get("heads") or {}).items():
        try:
            heads[name] = head_from_state(entry).to(device)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--load {loaded.source}: the head saved for {name} cannot be read ({exc})") from None
    return heads


def _seen_of(args: argparse.Namespace, loaded: LoadedModel, heads: dict) -> list[str] | None:
    """--label-space seen under --eval-only: the classification tasks the checkpoint records as trained (None:
    --label-space dataset). Refuses (one line, nothing written) a checkpoint that records none, a learned head
    that cannot join a union, and a method that builds its own task-agnostic head (only its training run can)."""
    if getattr(args, "label_space", DEFAULT_LABEL_SPACE) != SEEN:
        return None
    from mtil.models.heads import joins_union

    completed = (loaded.checkpoint.get("state") or {}).get("completed") or []
    seen = seen_tasks([str(name) for name in completed])
    if not seen:
        raise UserError(f"--label-space seen ranks among the classes of the tasks a checkpoint trained, and "
                        f"{loaded.source} records none: give --load of an mtil checkpoint of a training run (or "
                        f"--label-space dataset)")
    refused = [f"{name} ({head.kind})" for name, head in heads.items() if name in seen and not joins_union(head)]
    if refused:
        raise UserError(f"--label-space seen: the heads {loaded.source} learned for {', '.join(refused)} cannot be "
                        f"set beside other datasets' heads (their own image encoding or logit scale): use "
                        f"--label-space dataset")
    trained_by = (loaded.checkpoint.get("config") or {}).get("method")
    if trained_by:
        from mtil import registry
        from mtil.engine.method import Method

        try:
            method = registry.method_class(str(trained_by))
        except (KeyError, UserError, ValueError):
            method = None
        if method is not None and (method.label_space_seen_refused or
                                   method.task_agnostic_head is not Method.task_agnostic_head):
            why = method.label_space_seen_refused or "builds its own task-agnostic head, in its training run only"
            raise UserError(f"--label-space seen: --method {trained_by} (which trained {loaded.source}) {why}")
    return seen


def evaluate(args: argparse.Namespace) -> int:
    """Zero-shot top-1/top-5 of the model on every ``--eval-datasets`` entry; metric files under ``--save``."""
    seed_everything(args.seed)
    names = args.eval_datasets or list(BUILTIN_ORDER)
    # Report every missing thing at once (weights and data), not one per attempt.
    problems: list[str] = []
    for name in names:
        try:
            check_readable(name, args.data_location, args.download, ("test",))
        except UserError as exc:
            problems.append(str(exc))
    try:
        loaded = _load_model(args)
    except UserError as exc:
        problems.insert(0, str(exc))
    if problems:
        raise UserError("; ".join(problems))

    iteration = int(loaded.checkpoint.get("iteration", 0))
    completed = (loaded.checkpoint.get("state") or {}).get("completed") or []
    trained_by = (loaded.checkpoint.get("config") or {}).get("method")  # what trained the checkpoint, if it says
    if args.save:
        refuse_if_held(Path(args.save))
    device = next(loaded.model.parameters()).device
    announce_device(args.device, device)
    heads = _learned_heads(loaded, device)
    seen = _seen_of(args, loaded, heads)
    if args.wise_ft:
        _wise_ft(args, loaded)
    config = _resolved_config(args, loaded)
    precision = resolve_precision(args.precision, device)
    evaluator = ZeroShotEvaluator(loaded.model, data_location=args.data_location, download=args.download,
                                  batch_size=args.batch_size_eval, workers=args.workers,
                                  max_size=args.max_evaluation_size, seed=evaluation_sample_seed(args),
                                  autocast_dtype=None if args.precision == "auto" else DTYPES[precision])
    evaluator.learned_heads = heads
    print(f"Evaluation of {loaded.source} on {config['device']}"
          + (f" (learned heads for {', '.join(sorted(heads))})" if heads else ""))
    # A WiSE-FT blend is another model than the checkpoint: its rows go to their own metric files, never over the
    # checkpoint's own rows of the same iteration (e.g. when evaluating into the training run's folder).
    variant = f"wiseft{args.alpha:g}" if args.wise_ft else ""
    # --label-space seen is another measure than the checkpoint's own rows: metrics_<Dataset>_seen.csv
    variant = "_".join(v for v in (variant, SEEN if seen is not None else "") if v)
    save = Path(args.save) if args.save else None
    with FolderLock(save) if save else nullcontext():
        # trackers of an evaluation keep their files apart: a training run's tracker run in the folder stays its own
        records = Records.for_run(save, config, "eval-only", args.report_to or [], "eval-only",
                                  save / "eval-only" if save else None)
        failed = True
        try:
            records.start()
            reports = _report_writer(args, loaded, evaluator, f"_{variant}" if variant else "", iteration)
            if seen is not None:
                print(f"  label space seen: each dataset among its own classes and those of {', '.join(seen)}")
            for name in names:
                result = evaluator.evaluate(name) if seen is None else evaluator.evaluate(name, seen=seen)
                print(f"  {name:<16} top1 {result.top1:6.2f}%   top5 {result.top5:6.2f}%   ({result.classes} "
                      f"classes, {result.count} images{', learned head' if name in heads else ''})")
                records.evaluation(result_record(
                    dataset=name, iteration=iteration, top1=result.top1, top5=result.top5, images=result.count,
                    classes=result.classes, head=result.head, method=trained_by, variant=variant,
                    label_space=SEEN if seen is not None else DEFAULT_LABEL_SPACE), task=len(completed))
            if reports is not None:
                reports.finish(names)
            failed = False
        finally:
            records.close(failed)
    if args.save:
        print(f"Metrics written to {Path(args.save)}/metrics_<Dataset>.csv and results.jsonl")
    else:
        print("(no metric files written: give --save DIR to keep them)")
    return 0


def _report_writer(args: argparse.Namespace, loaded: LoadedModel, evaluator: ZeroShotEvaluator, label: str,
                   iteration: int):
    """--report: a writer whose one row (this evaluation) gives each dataset's final report."""
    if not args.report:
        return None
    from mtil.evaluation.report_writer import FINAL, REPORTS_FOLDER, ReportWriter

    method = (loaded.checkpoint.get("config") or {}).get("method")  # what trained the checkpoint, if it says
    header = {"model": _model_name(args, loaded), "load": loaded.source, "method": method, "eval_only": True}
    writer = ReportWriter(Path(args.save) / REPORTS_FOLDER, header, suffix=label)
    writer.attach(evaluator).begin(FINAL, after_task=None, iteration=iteration)
    return writer


def _wise_ft(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """Evaluation-time WiSE-FT: ``alpha * checkpoint + (1 - alpha) * zero-shot`` (zero-shot = the weights the
    checkpoint's sequence started from when it records them, else ``--model``)."""
    from mtil.engine.weights import interpolate, load_into
    from mtil.models.zeroshot_weights import ZeroShotWeights

    spec = (loaded.checkpoint.get("state") or {}).get("base") or {
        "model": args.model, "load": None, "untrained": args.untrained, "seed": args.seed, "clip_root": args.clip_root}
    zeroshot = ZeroShotWeights(spec, args)()
    current = {n: p.detach() for n, p in loaded.model.named_parameters()}
    load_into(loaded.model, interpolate(current, zeroshot, args.alpha))
    loaded.source += f", WiSE-FT alpha {args.alpha} with zero-shot weights ({spec['load'] or spec['model']})"


def eval_single(args: argparse.Namespace) -> int:
    """Print the ranked class probabilities of one image."""
    classnames = read_class_names(args.class_names)
    image = read_image(args.eval_single)
    loaded = _load_model(args)
    device = next(loaded.model.parameters()).device
    announce_device(args.device, device)
    if args.wise_ft:
        _wise_ft(args, loaded)
    dtype = None if args.precision == "auto" else DTYPES[resolve_precision(args.precision, device)]
    with autocast_for(device, dtype):
        ranked = classify_image(loaded.model, image, classnames, args.prompt)
    shown = ranked[:10]
    print(f"{args.eval_single} ({loaded.source}), prompt {args.prompt!r}:")
    for rank, (name, probability) in enumerate(shown, 1):
        print(f"  {rank:>2}. {name:<30} {100 * probability:6.2f}%")
    if len(ranked) > len(shown):
        print(f"  ... {len(ranked) - len(shown)} more classes below {100 * shown[-1][1]:.2f}%")
    return 0


def train(args: argparse.Namespace) -> int:
    """Train the task sequence (resuming from ``--save`` when it holds this run); exit 3 when preempted."""
    from mtil import registry
    from mtil.distributed import cleanup_distributed, launched_world_size, resolve_distributed
    from mtil.engine.preemption import INTERRUPT_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted, stop_on_signals
    from mtil.engine.sequence import SequenceRunner

    env = resolve_distributed(args.device) if launched_world_size() > 1 else None  # torchrun / srun
    runner = SequenceRunner(args, registry.build_components(args), flags_with_role(args, "path"), env=env)
    with stop_on_signals(runner.stop, interrupt=bool(args.save)):  # without --save, Ctrl-C has nothing to save
        try:
            runner.run()
            runner.parallel.barrier()  # no rank leaves the process group while another still uses it
        except Preempted as exc:
            if runner.parallel.is_main:
                print(f"mtil: {exc}; latest checkpoint saved in {args.save}; re-run the same command to resume")
            return INTERRUPT_EXIT_CODE if runner.stop.signum == signal.SIGINT else PREEMPTED_EXIT_CODE
        finally:
            cleanup_distributed()
    return 0


def seeds(args: argparse.Namespace) -> int:
    """``--seeds``: this command once per seed into ``<save>/seed<S>/``, then the mean ± std over the seeds."""
    from mtil.sweep.seeds import run_seeds

    return run_seeds(args)


def _recorded_method(results: Path) -> str | None:
    """The method of the last after-task evaluation in a results.jsonl (what a chain's links trained with)."""
    from mtil.evaluation.metrics_io import read_result_records

    method = None
    for record in read_result_records(results):
        if record.get("after_task") is not None and record.get("method"):
            method = str(record["method"])
    return method


def summarize(args: argparse.Namespace) -> int:
    """Matrix, summary and heat map from the results.jsonl a run or a chain of one-task runs left in a folder.
    The matrix file is never replaced by a less complete one (mtil.records.integrity)."""
    from mtil.evaluation.matrix import matrix_from_results, summarize as matrix_metrics, write_matrix
    from mtil.records.files import MATRIX, RESULTS, write_reports
    from mtil.records.integrity import apply_repairs, check_folder

    folder = Path(args.summarize)
    results = folder / RESULTS
    if not results.is_file():
        raise UserError(f"--summarize {folder}: no results.jsonl there (it is written by runs with --save {folder})")
    refuse_if_held(folder, "--summarize")
    try:
        repairs = check_folder(folder)  # a results.jsonl that lost what the matrix or a metrics file holds: one line
        long, order = matrix_from_results(results)
        if not long.empty and order:
            matrix_metrics(long, order, partial=True)  # rows beyond the order's tasks, a dataset twice in it
    except ValueError as exc:  # records whose accuracies are not numbers, or a matrix no sequence can have
        raise UserError(f"--summarize {folder}: results.jsonl holds records mtil cannot read ({exc})") from None
    except UserError as exc:
        raise UserError(f"--summarize {folder}: {exc}") from None
    if long.empty or not order:
        raise UserError(f"--summarize {folder}: results.jsonl holds no after-task evaluations")
    method = args.method if "method" in getattr(args, "_cli", ()) else _recorded_method(results) or args.method
    from mtil.evaluation.metrics_io import read_result_records

    try:
        method = summary_label(method, records_label_space(read_result_records(results), str(results)))
    except UserError as exc:
        raise UserError(f"--summarize {folder}: {exc}") from None
    with FolderLock(folder, "--summarize"):
        for warning in apply_repairs(folder, repairs, order):  # damaged or short metrics files, from the journal
            print(warning, file=sys.stderr)
        write_matrix(folder / MATRIX, long, order)
        write_reports(folder, method, long, order)
    print(f"Wrote {folder}/accuracy_matrix.csv, summary.csv and accuracy_matrix.png")
    return 0
