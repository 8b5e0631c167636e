"""Train a sequence of tasks in one process: zero-shot row, then train + evaluate each task, with exact resume.

Resume protocol: everything needed to continue lives in ``<save>/latest.pth``. Re-running the same command
continues from it (a finished run just prints its results); a different configuration on an unfinished run is
refused unless ``--force-resume``; a finished run in the same folder with a different configuration is the
one-task-per-process chain, which starts afresh from ``--load``.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import yaml

from mtil.adapters.feature_cache import store_of
from mtil.atomic import atomic_open
from mtil.datasets.captions import CAPTION_DATASETS, open_caption_dataset
from mtil.datasets.fewshot import check_views, protocol_of, task_data
from mtil.datasets.registry import check_readable
from mtil.distributed import DistributedEnv, init_distributed, is_main
from mtil.engine.checkpoint import (
    DERIVED,
    LATEST,
    PREVIOUS,
    RECORD_VERSION,
    capture_rng,
    config_differences,
    config_for_checkpoint,
    describe_differences,
    load_resumable,
    remove_orphaned_temporaries,
    restore_rng,
    save_checkpoint,
)
from mtil.engine.loop import train_steps
from mtil.engine.method import Method, ordered, run_after_task, run_before_task
from mtil.engine.numerics import check_weights_finite
from mtil.engine.optim import build_optimizer, parameter_groups
from mtil.engine.parallel import SINGLE, Parallel, check_batch_sizes
from mtil.engine.precision import DTYPES, configure_matmul, grad_scaler, resolve_precision
from mtil.engine.preemption import StopFlag
from mtil.engine.run import TASK_SETTINGS, Run, TaskContext, TaskSettings
from mtil.engine.schedule import warmup_cosine
from mtil.engine.state import TrainingState
from mtil.engine.tasks import has_length, overridden, resolve_tasks, steps_for, task_settings
from mtil.errors import UserError, no_space_cause, no_space_error
from mtil.evaluation import fewshot_report, matrix as mx
from mtil.evaluation.metrics_io import append_result_line, safe_name, write_metric_row
from mtil.evaluation.report_writer import REPORTS_FOLDER, ReportWriter
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.hardware import announce_device, resolve_device
from mtil.models.architectures import Architecture
from mtil.models.clip_loading import build_clip, load_clip, model_from_state_dict
from mtil.models.heads import head_from_state, head_state
from mtil.models.lora import base_state_dict
from mtil.models.train_modes import select_trainable, trainable_names, trains_text
from mtil.seeding import seed_everything


class _LogFile(logging.FileHandler):
    """``train.log``; a full disk stops the run with mtil's one line instead of logging's traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:
        cause = no_space_cause(sys.exc_info()[1])
        if cause is not None:
            raise no_space_error(self.baseFilename, cause) from None
        super().handleError(record)


def _logger(save_dir: Path | None) -> logging.Logger:
    log = logging.getLogger("mtil.train")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        handler = _LogFile(save_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    return log


def _say(run_log: logging.Logger, message: str) -> None:
    if is_main():  # several processes: rank 0 speaks for all (only it has a train.log)
        print(message, flush=True)
    run_log.info(message)


def _set_determinism(config: argparse.Namespace) -> None:
    if config.deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


# Settings that decide which parameters the optimiser holds: an interrupted task cannot continue across them.
OPTIMISER_SHAPING = {"method", "train_mode", "freeze", "optimizer", "lr_multipliers", "lora", "lora_r",
                     "lora_target_modules", "lora_shared", "lora_shared_split_qkvo", "lr_mult_vision",
                     "lr_mult_text", "lr_mult_proj", "adapter_rank"}


@dataclass
class Prepared:
    """What the checks built, handed to the run once nothing is left to refuse."""

    model: torch.nn.Module
    arch: Architecture
    device: torch.device
    state: TrainingState
    source: str
    heads: dict = field(default_factory=dict)


class SequenceRunner:
    """Owns one run: checks everything, builds it (fresh or resumed), trains every remaining task and writes
    every artefact. ``components`` (method first) come from the registry; the engine imports no method."""

    def __init__(self, config: argparse.Namespace, components: list[Method], path_keys: set[str] = frozenset(),
                 env: DistributedEnv | None = None):
        self.config = config
        self.env = env  # several processes (torchrun / srun): joined in build(), after every check passed
        self.parallel = Parallel(env.rank, env.world_size) if env is not None and env.distributed else SINGLE
        self.specs = resolve_tasks(config)
        if not self.specs:
            raise UserError("nothing to train: give --train-dataset A,B,... (or a named order) or --sequence FILE")
        repeated = sorted({s.dataset for s in self.specs if [t.dataset for t in self.specs].count(s.dataset) > 1})
        if repeated:
            raise UserError(f"{', '.join(repeated)} appears more than once in the sequence: each task is another "
                            f"dataset (the accuracy matrix has one column per dataset)")
        # read_dir: where a saved run is read from (every rank); save_dir: where files are written (rank 0 only)
        self.read_dir = Path(config.save) if config.save else None
        self.save_dir = self.read_dir if self.parallel.is_main else None
        self.path_keys = set(path_keys)
        self.components: list[Method] = components
        self.method: Method = self.components[0]
        self.settings: list[TaskSettings] = [task_settings(config, spec) for spec in self.specs]
        self.precision = resolve_precision(config.precision, resolve_device(config.device))
        record = {**vars(config), "precision": self.precision}  # the arithmetic this run really uses
        self.config_record = {**config_for_checkpoint(record, self.path_keys), "record_version": RECORD_VERSION,
                              "task_settings": [{"dataset": spec.dataset, **vars(settings)}
                                                for spec, settings in zip(self.specs, self.settings)]}
        self.stop = StopFlag()
        self.resumed: dict | None = None
        self.resumed_from: Path | None = None  # the checkpoint read on resume (latest.pth, or a fallback)
        self.latest_is_good = False  # latest.pth on disk was read or written and verified by this process
        self.reports: ReportWriter | None = None  # --report: classification reports (build attaches it)

    # ---------------------------------------------------------------- checks (nothing written)
    def check_settings(self) -> None:
        """Every task has a length (unless the method trains nothing)."""
        check_batch_sizes({spec.dataset: settings.batch_size for spec, settings in zip(self.specs, self.settings)},
                          self.parallel.world_size)
        for flag, size in type(self.method).shared_batch_sizes(self.config).items():
            check_batch_sizes({"": size}, self.parallel.world_size, flag)
        if self.method.training_free or type(self.method).sets_task_length(self.config):
            return
        missing = [spec.dataset for spec, settings in zip(self.specs, self.settings) if not has_length(settings)]
        if missing:
            raise UserError(f"training needs a length: give --iterations N or --epochs N (or set it per task in "
                            f"--sequence); no length for {', '.join(missing)}")

    def check_data(self) -> None:
        """Every dataset the run reads is there and its first items decode; reference data is there. All the
        problems are reported together."""
        config, problems = self.config, []

        def attempt(check, *args, **kwargs) -> bool:
            try:
                check(*args, **kwargs)
                return True
            except UserError as exc:
                problems.append(str(exc))
                return False

        for spec in self.specs:
            if self.method.needs_classification_data:
                if attempt(check_readable, spec.dataset, config.data_location, config.download, ("train", "test")):
                    attempt(check_views, spec.dataset, config, trained=True)  # few-shot draws, base/new halves
            elif spec.dataset not in CAPTION_DATASETS:
                problems.append(f"--method {config.method} trains on a caption dataset "
                                f"({', '.join(CAPTION_DATASETS)}), not {spec.dataset!r}")
            else:
                attempt(open_caption_dataset, spec.dataset, config.data_location)
        trained = {spec.dataset for spec in self.specs}
        for name in config.eval_datasets or []:
            if name not in trained and name not in CAPTION_DATASETS:
                if attempt(check_readable, name, config.data_location, config.download, ("test",)):
                    attempt(check_views, name, config, trained=False)
        for component in self.components:
            attempt(component.check_inputs)
        if problems:
            raise UserError("; ".join(dict.fromkeys(problems)))

    def check_model(self, arch: Architecture) -> None:
        """Settings that depend on the model's structure: --freeze patterns, something left to train, and each
        component's own (OGD's tracked weights, LoRA's targets and trainable adapters). They run on twins built on
        the meta device (names and shapes, no memory)."""
        config = self.config

        def twin() -> torch.nn.Module:
            with torch.device("meta"):  # a fresh one each: a component may modify its own (LoRA injects)
                return build_clip(arch)

        if not any(c.trains_instead_of_clip for c in self.components):
            names = trainable_names(twin(), config.train_mode, config.freeze)  # also checks the --freeze patterns
            head = config.train_mode in ("image-fc", "fc")  # image-fc-fixed's head is frozen
            if not self.method.training_free and not names and not head:
                raise UserError(f"--train-mode {config.train_mode} with --freeze {','.join(config.freeze or [])} "
                                f"leaves nothing to train")
        for component in self.components:
            component.check_model(twin())

    def _continues_chain(self) -> bool:
        """A chain link loads the previous link's task checkpoint from the same folder."""
        return bool(self.config.load) and Path(self.config.load).resolve().parent == self.read_dir.resolve()

    def _saved_latest(self) -> dict | None:
        """The checkpoint to resume from: latest.pth, or when it is damaged (or gone while latest.prev.pth is
        there) the newest good earlier one: latest.prev.pth, then the task checkpoints, newest first. Never
        starts over silently: with no good checkpoint it is a one-line error."""
        if self.read_dir is None:
            return None
        latest, previous = self.read_dir / LATEST, self.read_dir / PREVIOUS
        if not latest.is_file() and not previous.is_file():
            return None
        damage = f"{latest} is missing"
        if latest.is_file():
            try:
                saved = load_resumable(latest)
                self.resumed_from, self.latest_is_good = latest, True
                return saved
            except UserError as exc:
                damage = str(exc)
        tasks = sorted((p for p in self.read_dir.glob("*.pth") if p.name not in (LATEST, PREVIOUS)),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        for fallback in [previous, *tasks]:
            if not fallback.is_file():
                continue
            try:
                saved = load_resumable(fallback)
            except UserError:
                continue
            state = saved["state"]
            if self.parallel.is_main:
                print(f"mtil: {damage}; resuming from the last good checkpoint {fallback} (after "
                      f"{len(state.get('completed', []))} tasks, step {state.get('step', 0)})")
            self.resumed_from = fallback
            return saved
        raise UserError(f"{damage}, and {self.read_dir} holds no earlier good checkpoint ({PREVIOUS} or a task "
                        f"checkpoint) to resume from; move the folder away to start over")

    def _resumable(self, saved: dict) -> dict | None:
        """``saved`` if this command resumes it; None if it starts the next link of a chain; else a UserError."""
        state = TrainingState.from_dict(saved["state"])
        differences = config_differences(saved.get("config", {}), self.config_record,
                                         getattr(self.config, "_defaults", {}), self.path_keys,
                                         ignore=getattr(self.config, "_unused", ()))
        if not differences:
            return saved
        if state.finished and self._continues_chain():
            return None  # the previous link of a one-process-per-task chain: this link starts from its checkpoint
        described = describe_differences(differences)
        if state.finished:
            raise UserError(
                f"{self.read_dir} holds a finished run with other settings (saved -> now: {described}); use another "
                f"--save (a chain's next link must --load a checkpoint from that folder)"
            )
        mid_task = state.step > 0 and "optimizer" in saved
        structural = [k for k, _, _ in differences if k in OPTIMISER_SHAPING]
        if self.config.force_resume and mid_task and structural:
            raise UserError(
                f"--force-resume cannot carry {self.read_dir}'s interrupted task over a change of "
                f"{', '.join('--' + k.replace('_', '-') for k in structural)}: its saved optimiser state belongs to "
                f"other parameters; resume with the saved values (saved -> now: {described}) or use another --save")
        if self.config.force_resume:
            print(f"--force-resume: resuming although these settings changed (saved -> now): {described} (a task "
                  f"interrupted mid-way keeps its saved optimiser and schedule; new settings apply from the next task)")
            return saved
        raise UserError(
            f"{self.read_dir} holds an unfinished run with other settings (saved -> now: {described}); re-run with "
            f"its settings to resume, pass --force-resume to resume anyway, or use another --save"
        )

    def _fresh(self, device: torch.device) -> Prepared:
        config = self.config
        loaded = load_clip(config.model, clip_root=config.clip_root, untrained=config.untrained, load=config.load,
                           device=device, seed=config.seed, name_given="model" in getattr(config, "_cli", ()))
        previous = chain_state(loaded.checkpoint, config)
        completed = list(previous.get("completed", []))
        again = [s.dataset for s in self.specs if s.dataset in completed]
        if again:
            raise UserError(f"--load {config.load} continues a --method {config.method} run that already trained "
                            f"{', '.join(again)} (its tasks: {', '.join(completed)}): a chain's next link trains "
                            f"other datasets")
        state = TrainingState(sequence=completed + [s.dataset for s in self.specs], completed=completed,
                              global_step=int(previous.get("global_step", 0)), zero_shot_evaluated=bool(completed),
                              base=previous.get("base") or base_spec(config, self.path_keys))
        # a chain's --load brings the heads learned so far
        return Prepared(loaded.model, loaded.arch, device, state, loaded.source, loaded.checkpoint.get("heads") or {})

    def prepare(self) -> Prepared:
        """Every check, cheapest first; reads files, writes none. The settings are checked against the model
        before a saved run is compared with this command, so a typo is reported as itself, not as "other
        settings" of an unfinished run."""
        config = self.config
        self.check_settings()
        self.check_data()
        device = self.env.device if self.parallel.distributed else resolve_device(config.device)
        saved = self._saved_latest()
        if saved is not None:
            arch = Architecture.from_dict(saved["arch"])
            prepared = Prepared(model_from_state_dict(saved["model"], arch).to(device), arch, device,
                                TrainingState.from_dict(saved["state"]), f"resumed from {self.resumed_from}",
                                saved.get("heads", {}))
        else:
            prepared = self._fresh(device)
        self.check_model(prepared.arch)
        if saved is not None:
            self.resumed = self._resumable(saved)
            if self.resumed is None:  # the next link of a chain starts from its --load
                prepared = self._fresh(device)
                self.check_model(prepared.arch)
        return prepared

    def build(self) -> Run:
        """Check everything, then (and only then) create the save folder, its log and config.yaml."""
        config = self.config
        prepared = self.prepare()
        if self.parallel.distributed:  # every check passed on this rank: join the others
            init_distributed(self.env)
        device, state = prepared.device, prepared.state
        announce_device(config.device, device)
        _set_determinism(config)
        configure_matmul(device, config.deterministic)
        seed_everything(config.seed)
        precision = self.precision
        log = _logger(self.save_dir)
        if self.save_dir is not None:
            orphans = remove_orphaned_temporaries(self.save_dir)
            if orphans:
                _say(log, f"removed {len(orphans)} temporary file(s) an interrupted write left: {', '.join(orphans)}")
            typed = set(getattr(config, "_cli", ())) | set(getattr(config, "_file", ()))
            write_config_file(self.save_dir / "config.yaml", self.config_record, self._applied_settings(), typed)
        self.parallel.barrier()  # rank 0 removed the orphans before another rank could read the folder
        evaluator = ZeroShotEvaluator(prepared.model, data_location=config.data_location, download=config.download,
                                      batch_size=config.batch_size_eval, workers=config.workers,
                                      max_size=config.max_evaluation_size, seed=config.seed,
                                      autocast_dtype=DTYPES[precision])
        evaluator.fewshot = protocol_of(config)
        evaluator.parallel = self.parallel
        evaluator.feature_store = store_of(config, precision)  # --feature-cache DIR (Tip-Adapter's), else None
        if getattr(config, "report", False) and self.save_dir is not None:
            self.reports = ReportWriter(self.save_dir / REPORTS_FOLDER, {
                "model": config.model, "load": config.load, "method": config.method, "train_mode": config.train_mode,
                "sequence": list(state.sequence)}).attach(evaluator)
        run = Run(config, prepared.model, prepared.arch, device, state, evaluator, self.save_dir, log,
                  precision=precision, parallel=self.parallel)
        run.zeroshot_state = ZeroShotWeights(state.base, config)
        run.task_settings = {spec.dataset: settings for spec, settings in zip(self.specs, self.settings)}
        evaluator.learned_heads = run.heads
        for name, entry in prepared.heads.items():
            run.heads[name] = head_from_state(entry).to(device)
        if self.resumed is not None:
            for component in self.components:
                component.load_state_dict(self.resumed.get("methods", {}).get(component.name, {}))
        processes = f", {self.parallel.world_size} processes ({self.env.launcher}, {self.env.backend})" \
            if self.parallel.distributed else ""
        _say(log, f"mtil: {config.method} ({config.train_mode}) on {', '.join(state.sequence)}; model "
                  f"{prepared.source}; device {device}, precision {precision}, {torch.get_num_threads()} threads"
                  f"{processes}")
        for line in self._settings_report():
            _say(log, line)
        return run

    def _applied_settings(self) -> dict[str, dict]:
        return {spec.dataset: {k: v for k, v in vars(settings).items() if v is not None}
                for spec, settings in zip(self.specs, self.settings)}

    def _settings_report(self) -> list[str]:
        """What each task trains with, where a sequence gave per-task values (and which typed flags won)."""
        lines = []
        replaced = overridden(self.config, self.specs)
        for key, tasks in replaced.items():
            lines.append(f"note: --{key.replace('_', '-')} given on the command line (or in --config) replaces "
                         f"{self.config.train_dataset}'s per-task {key} ({', '.join(tasks)})")
        if any(spec.overrides for spec in self.specs) and not self.method.training_free:
            for spec, settings in zip(self.specs, self.settings):
                length = f"{settings.iterations} iterations" if settings.iterations is not None else \
                    f"{settings.epochs} epochs"
                lines.append(f"  {spec.dataset}: lr {settings.lr:g}, {length}, batch {settings.batch_size}")
        return lines

    # ---------------------------------------------------------------- checkpoints
    def _payload(self, run: Run, with_optimizer: bool) -> dict:
        task = run.task
        payload = {
            "arch": run.arch.to_dict(),
            # plain CLIP names and weights; mid-task LoRA adapters travel in their component's state
            "model": {k: v.detach().cpu() for k, v in base_state_dict(run.model).items()},
            "heads": {n: head_state(h) for n, h in run.heads.items()},
            "methods": {c.name: c.state_dict() for c in self.components},
            "rng": capture_rng(),
            "state": run.state.to_dict(),
            "iteration": run.state.global_step,
            "config": self.config_record,
        }
        check_weights_finite(payload["model"], "a checkpoint")
        if with_optimizer and task is not None and task.optimizer is not None:
            payload["optimizer"] = task.optimizer.state_dict()
            payload["scheduler"] = task.scheduler.state_dict()
            if (task_start := run.task_start.state_dict()) is not None:  # once, for every component that uses it
                payload["task_start"] = task_start
            if task.scaler is not None:
                payload["scaler"] = task.scaler.state_dict()
        return payload

    def save_latest(self, run: Run, with_optimizer: bool = True, payload: dict | None = None) -> None:
        """Write latest.pth, keeping the one it replaces as latest.prev.pth when that one is known good."""
        if self.save_dir is not None:
            save_checkpoint(self.save_dir / LATEST, payload or self._payload(run, with_optimizer),
                            keep_previous=self.latest_is_good)
            self.latest_is_good = True
        self.parallel.barrier()  # the other ranks go on once rank 0's checkpoint is complete

    # ---------------------------------------------------------------- evaluation
    def eval_names(self, run: Run) -> list[str]:
        names = self.config.eval_datasets or run.state.sequence
        return [n for n in names if n not in CAPTION_DATASETS]

    def evaluate_row(self, run: Run, after_task: int | None) -> list[dict]:
        rows, fewshot_rows = [], []
        protocol = run.evaluator.fewshot
        part = fewshot_report.matrix_part(protocol)
        if self.reports is not None:
            self.reports.begin_row(after_task, len(run.state.sequence), iteration=run.state.global_step)
        for name in self.eval_names(run):
            result = run.evaluator.evaluate(name, "test", part)
            rows.append({"after_task": after_task, "dataset": name, "top1": result.top1, "top5": result.top5})
            if self.save_dir is not None:
                write_metric_row(self.save_dir, name, run.state.global_step, result.top1, result.top5)
                append_result_line(self.save_dir, {
                    "dataset": name, "iteration": run.state.global_step, "after_task": after_task,
                    "sequence": run.state.completed, "top1": result.top1, "top5": result.top5,
                    "images": result.count, "method": self.config.method,
                    **({"classes": part} if protocol is not None else {})}, self.config_record)
            if protocol is not None and after_task is not None:
                fewshot_rows += fewshot_report.evaluate_extra(run.evaluator, protocol, name, result,
                                                              with_val=name in run.state.sequence)
        label = "zero-shot" if after_task == 0 else (f"after task {after_task}" if after_task else
                                                    f"step {run.state.step}")
        _say(run.log, f"[{label}] " + "  ".join(f"{r['dataset']} {r['top1']:.2f}" for r in rows))
        if fewshot_rows:
            _say(run.log, fewshot_report.format_line(label, fewshot_rows))
            if self.save_dir is not None:
                fewshot_report.write_rows(self.save_dir, after_task, fewshot_rows)
        if self.reports is not None:
            self.reports.finish(self.eval_names(run), lambda line: _say(run.log, line))
        if after_task is not None and self.save_dir is not None and rows:
            path = self.save_dir / "accuracy_matrix.csv"
            long = read_or_rebuild_matrix(path) if path.is_file() else mx.empty_matrix()
            mx.write_matrix(path, mx.upsert_rows(long, rows), run.state.sequence)
        self.parallel.barrier()
        return rows

    # ---------------------------------------------------------------- tasks
    def _start_task(self, run: Run) -> TaskContext:
        config, state = self.config, run.state
        name = state.current_task
        index = state.task_index - (len(state.sequence) - len(self.specs))
        settings = self.settings[index]
        data = task_data(config, name) if self.method.needs_classification_data else None
        task = TaskContext(name=name, settings=settings, data=data)
        run.task = task
        instead = any(c.trains_instead_of_clip for c in self.components)  # e.g. LoRA: --freeze names adapters
        select_trainable(run.model, config.train_mode, None if instead else config.freeze)
        if self.method.trains_logit_scale:
            run.model.logit_scale.requires_grad_(True)
        if self.method.training_free:
            for param in run.model.parameters():
                param.requires_grad_(False)
        run_before_task(run, task, self.components)
        if self.method.training_free:
            task.total_steps = state.total_steps = 0
            return task
        raw, _, _ = self.method.train_items(run, task)
        own = steps_for(settings, len(raw)) if has_length(settings) else 0  # 0: the method gives the length
        task.total_steps = self.method.task_steps(run, task, own)
        state.total_steps = task.total_steps
        if task.total_steps == 0:  # e.g. joint training waits for the last task: nothing to optimise here
            return task
        extra = [m for c in self.components for m in c.extra_modules(run, task)]
        groups = parameter_groups(run.model, extra, settings.lr, config.lr_multipliers)
        for component in ordered(self.components, "parameter_groups"):  # the method first, then components
            groups = component.parameter_groups(run, task, groups)
        if not any(group["params"] for group in groups):
            raise UserError(f"--train-mode {config.train_mode} with --freeze {config.freeze} leaves nothing to train")
        task.optimizer = self.method.optimizer(run, task, groups) or \
            build_optimizer(config.optimizer, groups, settings, config.momentum)
        task.scheduler = warmup_cosine(task.optimizer, settings.warmup_length, task.total_steps)
        task.scaler = grad_scaler(run.precision, run.device)
        return task

    def _text_changes(self) -> bool:
        return trains_text(self.config.train_mode) or self.method.trains_logit_scale

    def _evaluate_mid_task(self, run: Run) -> list[dict]:
        run.evaluator.model_changed(text_changed=self._text_changes())  # cached heads predate these steps
        return self.evaluate_row(run, None)

    def _train_one_task(self, run: Run) -> None:
        state = run.state
        resuming_mid_task = self.resumed is not None and state.step > 0 and "optimizer" in self.resumed
        if self.resumed is not None and not resuming_mid_task and "rng" in self.resumed:
            # a resume at a task boundary continues the random streams from where the saved run left them (as a
            # run that was never stopped would), not from the fresh seeding of start-up
            restore_rng(self.resumed["rng"])
        task = self._start_task(run)
        if resuming_mid_task:
            # the interface's contract: on a mid-task resume the method state overrides what before_task rebuilt.
            for component in self.components:
                component.load_state_dict(self.resumed.get("methods", {}).get(component.name, {}))
            # before_task captured the current weights as the task-start copy: the saved ones replace them in place
            run.task_start.restore(self.resumed.get("task_start"))
            task.optimizer.load_state_dict(self.resumed["optimizer"])
            task.scheduler.load_state_dict(self.resumed["scheduler"])
            if task.scaler is not None and "scaler" in self.resumed:
                task.scaler.load_state_dict(self.resumed["scaler"])
            restore_rng(self.resumed["rng"])
            _say(run.log, f"resuming {task.name} at step {state.step}/{task.total_steps}")
        else:
            state.step = 0
        self.resumed = None  # consumed
        stream_id = state.task_index
        train_steps(run, task, self.components, stream_id, stop=self.stop,
                    save_latest=lambda: self.save_latest(run),
                    evaluate_mid_task=lambda: self._evaluate_mid_task(run))
        run_after_task(run, task, self.components)
        state.completed.append(task.name)
        state.step = 0
        state.task_evaluated = False
        run.evaluator.model_changed(text_changed=self._text_changes())
        if self.save_dir is not None:
            payload = self._payload(run, with_optimizer=False)
            keep = self.config.keep_checkpoints
            if keep != "none":
                save_checkpoint(self.save_dir / f"{safe_name(task.name)}.pth", payload)
            self.save_latest(run, payload=payload)
            if keep != "all":  # only once the new checkpoints are written: never fewer than one good copy
                kept = {safe_name(task.name)} if keep == "last" else set()
                self._remove_task_checkpoints([n for n in state.completed if safe_name(n) not in kept])
        else:
            self.parallel.barrier()  # rank 0's save_latest above ends in the same barrier
        run.task = None

    def _remove_task_checkpoints(self, tasks: list[str]) -> None:
        """Delete the task checkpoints of ``tasks`` (--keep-checkpoints last / none); a missing one is fine."""
        for name in tasks:
            (self.save_dir / f"{safe_name(name)}.pth").unlink(missing_ok=True)

    # ---------------------------------------------------------------- the whole sequence
    def run(self) -> Run:
        run = self.build()
        state = run.state
        if state.finished:
            _say(run.log, f"{self.save_dir} already holds this finished run; nothing to resume")
            if self.reports is not None:  # re-run with --report: the final reports it lacks, from its final weights
                self.reports.catch_up(self.eval_names(run), lambda line: _say(run.log, line),
                                      after_task=len(state.completed), iteration=state.global_step)
        if not state.zero_shot_evaluated:
            self.evaluate_row(run, 0)
            state.zero_shot_evaluated = True
            self.save_latest(run, with_optimizer=False)
        while not state.finished:
            if state.task_evaluated:
                self._train_one_task(run)
            self.evaluate_row(run, len(state.completed))
            state.task_evaluated = True
            self.save_latest(run, with_optimizer=False)
        self.report(run)
        return run

    def report(self, run: Run) -> None:
        if self.save_dir is None:
            return
        path = self.save_dir / "accuracy_matrix.csv"
        if not path.is_file():
            return
        long = read_or_rebuild_matrix(path)
        trained = [name for name in run.state.sequence if name not in CAPTION_DATASETS]
        if not trained:  # e.g. contrastive pre-training: the matrix shows zero-shot ability before and after
            datasets = list(dict.fromkeys(long["dataset"]))
            print(mx.to_wide(long, datasets).round(2).to_string())
            return
        write_reports(self.save_dir, self.config.method, long, trained, run.log)
        protocol = run.evaluator.fewshot
        if protocol is not None and (results := fewshot_report.final_results(self.save_dir)):
            _say(run.log, f"Few-shot protocol: {protocol.describe()}; at the end "
                          f"({fewshot_report.FEWSHOT_FILE}):\n{fewshot_report.format_table(results)}")


def read_or_rebuild_matrix(path: Path):
    """``accuracy_matrix.csv``, or when it is damaged the matrix rebuilt from the ``results.jsonl`` beside it
    (which holds every evaluation), saying so; a one-line error when neither can be read."""
    try:
        return mx.read_matrix(path)
    except (UnicodeDecodeError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        results = path.parent / "results.jsonl"
        long = mx.matrix_from_results(results)[0] if results.is_file() else mx.empty_matrix()
        if long.empty:
            raise UserError(f"{path} is damaged ({type(exc).__name__}) and {results} holds no evaluations to rebuild "
                            f"it from; move it away (the evaluations that follow write a new one)") from None
        print(f"mtil: warning: {path} is damaged ({type(exc).__name__}); rebuilt from {results.name}", file=sys.stderr)
        return long


def chain_state(checkpoint: dict, config: argparse.Namespace) -> dict:
    """The task history a ``--load``ed mtil checkpoint passes on.

    A checkpoint of a run of the same method continues that run's sequence (the one-process-per-task chain: its
    tasks, step count and zero-shot weights carry over). One from another method — e.g. contrastive pre-training —
    only provides starting weights: a new sequence starts from them, and they are its zero-shot weights.
    """
    previous = checkpoint.get("state") or {}
    if (checkpoint.get("config") or {}).get("method") != config.method:
        return {}
    return previous


def base_spec(config: argparse.Namespace, path_keys: set[str] = frozenset()) -> dict:
    """How to rebuild the zero-shot (pre-sequence) weights: recorded in the state, so that every link of a chain
    and every resumed run refers to the same weights without storing a second copy in each checkpoint (paths
    resolved, so a chain link started from another folder finds them)."""
    record = config_for_checkpoint({k: getattr(config, k) for k in ("model", "load", "clip_root")},
                                   path_keys | {"load", "clip_root"})
    return {**record, "untrained": config.untrained, "seed": config.seed}


def write_config_file(path: Path, record: dict, applied: dict[str, dict], typed: set[str]) -> None:
    """``<save>/config.yaml``: the resolved settings, such that ``--config`` of this file repeats the run, and as
    comments what each task trained with. Per-task settings the command did not type stay comments: typed, they
    would replace a named order's per-task values (the rule of task_settings)."""
    settings = {k: v for k, v in record.items() if k != "config" and k not in DERIVED}
    kept = {k: v for k, v in settings.items() if k not in TASK_SETTINGS or k in typed}
    lines = ["# mtil: the resolved settings of this run; `python -m mtil.main --config config.yaml` repeats it.",
             "# Per-task settings applied:"]
    lines += [f"#   {task}: " + ", ".join(f"{k} {v}" for k, v in values.items()) for task, values in applied.items()]
    lines += ["# Not typed, so a named order's per-task values apply over them (defaults otherwise):"]
    lines += [f"#   {k}: {v}" for k, v in settings.items() if k not in kept]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(kept, sort_keys=False, default_flow_style=None)
    with atomic_open(path, "w") as handle:
        handle.write(text)


class ZeroShotWeights:
    """The zero-shot weights (CPU state dict), loaded on first use and kept."""

    def __init__(self, spec: dict, config: argparse.Namespace):
        self.spec, self.config, self._weights = spec, config, None

    def __call__(self) -> dict[str, torch.Tensor]:
        if self._weights is None:
            spec = self.spec
            model = load_clip(spec["model"], clip_root=spec.get("clip_root") or self.config.clip_root,
                              untrained=spec["untrained"], load=spec["load"], device="cpu", seed=spec["seed"]).model
            self._weights = {n: p.detach() for n, p in model.named_parameters()}
        return self._weights


def write_reports(save_dir: Path, method: str, long, order: list[str], log: logging.Logger | None = None) -> dict:
    """Print the matrix and its metrics; write summary.csv and the heat map beside the matrix."""
    print(mx.format_matrix(long, order))
    complete = True
    try:
        metrics = mx.summarize(long, order)
    except ValueError:
        metrics, complete = mx.summarize(long, order, partial=True), False
    row = {"method": method, **metrics}
    mx.write_summary(save_dir / "summary.csv", [row])
    mx.plot_heatmap(long, order, save_dir / "accuracy_matrix.png", title=method)
    text = mx.format_summary([row]) + ("" if complete else "\n(partial: some cells of the matrix are missing)")
    print(text)
    if log is not None:
        log.info("summary %s", {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return row
