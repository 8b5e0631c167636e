"""Train a sequence of tasks in one process: zero-shot row, then train + evaluate each task, with exact resume.

This module keeps the order of a run; the checks live in :mod:`mtil.engine.checks`, the resume decision in
:mod:`mtil.engine.resume`, and everything the run records (metric files, trackers) goes through its records owner
(:mod:`mtil.records`). Resume protocol: everything needed to continue lives in ``<save>/latest.pth``. Re-running
the same command continues from it (a finished run just prints its results); a different configuration on an
unfinished run is refused unless ``--force-resume``; a finished run in the same folder with a different
configuration is the one-task-per-process chain, which starts afresh from ``--load``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtil.adapters.feature_cache import store_of
from mtil.datasets.captions import CAPTION_DATASETS
from mtil.datasets.fewshot import protocol_of, task_data
from mtil.distributed import DistributedEnv, init_distributed
from mtil.engine import checks, resume
from mtil.engine.chain_fill import fill_earlier_rows, missing_cells
from mtil.engine.checkpoint import DERIVED, LATEST, RECORD_VERSION, capture_rng, config_for_checkpoint, \
    remove_orphaned_temporaries, restore_rng, save_checkpoint
from mtil.engine.loop import train_steps
from mtil.engine.method import Method, ordered, run_after_task, run_before_task, run_label
from mtil.engine.numerics import WeightsGuard
from mtil.engine.optim import build_optimizer, parameter_groups
from mtil.engine.precision import DTYPES, configure_matmul, grad_scaler, resolve_precision, set_determinism
from mtil.engine.preemption import Preempted, StopFlag
from mtil.engine.run import TASK_SETTINGS, Run, TaskContext, TaskSettings
from mtil.engine.run_log import open_log, say as _say
from mtil.engine.schedule import fair_warmup, warmup_cosine
from mtil.engine.state import TrainingState
from mtil.engine.task_report import applied_settings, settings_lines
from mtil.engine.tasks import has_length, resolve_tasks, steps_for, task_settings, warmup_chosen
from mtil.errors import UserError
from mtil.evaluation import fewshot_report
from mtil.evaluation.label_space import DEFAULT_LABEL_SPACE, SEEN, records_label_space, seen_tasks, summary_label
from mtil.evaluation.metrics_io import read_result_records, safe_name, short_name
from mtil.evaluation.report_writer import REPORTS_FOLDER, ReportWriter
from mtil.evaluation.zeroshot import ZeroShotEvaluator
from mtil.folder_lock import FolderLock, refuse_if_held
from mtil.hardware import announce_device, resolve_device
from mtil.models.backend import logit_bias
from mtil.models.clip_loading import ModelRecord, load_clip, model_from_record, record_from_dict
from mtil.models.heads import head_from_state, head_state
from mtil.models.lora import base_state_dict
from mtil.tensor_files import payload_tensors
from mtil.models.train_modes import select_trainable, trains_text
from mtil.models.zeroshot_weights import ZeroShotWeights
from mtil.parallel import SINGLE, Parallel
from mtil.records import Records
from mtil.records.files import MATRIX, read_or_rebuild_matrix, result_record
from mtil.records.integrity import Repairs, apply_repairs, check_folder
from mtil.seeding import seed_everything


@dataclass
class Prepared:
    """What the checks built, handed to the run once nothing is left to refuse."""

    model: torch.nn.Module
    arch: ModelRecord
    device: torch.device
    state: TrainingState
    source: str
    heads: dict = field(default_factory=dict)


class SequenceRunner:
    """Owns the order of one run: checks everything, builds it (fresh or resumed), trains every remaining task and
    evaluates after each. ``components`` (method first) come from the registry; the engine imports no method."""

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
        self.config_record = {**config_for_checkpoint(record, self.path_keys, roles=config._roles),
                              "record_version": RECORD_VERSION,
                              "task_settings": [{"dataset": spec.dataset, **vars(settings)}
                                                for spec, settings in zip(self.specs, self.settings)]}
        self.stop = StopFlag()
        self.resumed: dict | None = None
        self.resumed_from: Path | None = None  # the checkpoint read on resume (latest.pth, or a fallback)
        self.latest_is_good = False  # latest.pth on disk was read or written and verified by this process
        self.guard = WeightsGuard()  # build() bounds the saved weights by the model's start
        self.reports: ReportWriter | None = None  # --report: classification reports (build attaches it)
        self.label = run_label(components, config)  # finetune+ema: what tables and files call this run
        # --label-space: dataset (each test set among its own classes) or seen (among every trained task's too)
        self.label_space = getattr(config, "label_space", DEFAULT_LABEL_SPACE)
        # what the summary, the tables and the heat map call the run (the label space said when it is not dataset)
        self.summary_label = summary_label(self.label, self.label_space)
        self.records = Records(None, self.config_record, self.summary_label)  # build() gives it the folder
        self.repairs: Repairs | None = None  # metric files to rebuild on resume (found in prepare)
        self.lock: FolderLock | None = None

    # ---------------------------------------------------------------- checks (nothing written)
    def check_settings(self) -> None:
        checks.check_settings(self.config, [s.dataset for s in self.specs], self.settings, self.method,
                              self.parallel.world_size)

    def check_data(self) -> None:
        checks.check_data(self.config, [s.dataset for s in self.specs], self.components)

    def check_model(self, arch: ModelRecord) -> None:
        checks.check_model(self.config, arch, self.components)

    def _fresh(self, device: torch.device) -> Prepared:
        config = self.config
        loaded = load_clip(config.model, clip_root=config.clip_root, untrained=config.untrained, load=config.load,
                           device=device, seed=config.seed, name_given="model" in getattr(config, "_cli", ()))
        previous = resume.chain_state(loaded.checkpoint, config)
        completed = list(previous.get("completed", []))
        again = [s.dataset for s in self.specs if s.dataset in completed]
        if again:
            raise UserError(f"--load {config.load} continues a --method {config.method} run that already trained "
                            f"{', '.join(again)} (its tasks: {', '.join(completed)}): a chain's next link trains "
                            f"other datasets")
        state = TrainingState(sequence=completed + [s.dataset for s in self.specs], completed=completed,
                              global_step=int(previous.get("global_step", 0)), zero_shot_evaluated=bool(completed),
                              base=previous.get("base") or resume.base_spec(config, self.path_keys))
        # a chain's --load brings the heads learned so far
        return Prepared(loaded.model, loaded.arch, device, state, loaded.source, loaded.checkpoint.get("heads") or {})

    def prepare(self) -> Prepared:
        """Every check, cheapest first; reads files, writes none. The settings are checked against the model
        before a saved run is compared with this command, so a typo is reported as itself, not as "other
        settings" of an unfinished run."""
        config = self.config
        if self.save_dir is not None:
            refuse_if_held(self.save_dir)  # another process runs in this folder: touch nothing of it
        self.check_settings()
        self.check_data()
        device = self.env.device if self.parallel.distributed else resolve_device(config.device)
        saved_run = resume.find_saved(self.read_dir, speak=self.parallel.is_main)
        saved = saved_run.payload if saved_run is not None else None
        if saved_run is not None:
            self.resumed_from, self.latest_is_good = saved_run.path, saved_run.is_latest
            arch = record_from_dict(saved["arch"])
            prepared = Prepared(model_from_record(saved["model"], arch).to(device), arch, device,
                                TrainingState.from_dict(saved["state"]), f"resumed from {self.resumed_from}",
                                saved.get("heads", {}))
        else:
            prepared = self._fresh(device)
        self.check_model(prepared.arch)
        if saved is not None:
            self.resumed = resume.decide(saved, config, self.config_record, self.read_dir, self.path_keys)
            if self.resumed is None:  # the next link of a chain starts from its --load
                prepared = self._fresh(device)
                self.check_model(prepared.arch)
            elif prepared.state.finished:
                resume.check_finished_run(self.read_dir, prepared.state)
        if self.save_dir is not None and self.save_dir.is_dir():  # the metric files against their journal
            state = prepared.state
            rows_done = (len(state.completed) + (1 if state.task_evaluated else 0)) if state.zero_shot_evaluated \
                else 0
            self.repairs = check_folder(self.save_dir, upto=state.global_step if self.resumed else None,
                                        rows_done=rows_done if self.resumed else None)
        self.check_label_space()
        return prepared

    def check_label_space(self) -> None:
        """The matrix cells already in the folder (a resumed run, a chain's earlier links) are of this run's label
        space: one matrix never mixes two."""
        if self.read_dir is None:
            return
        results = self.read_dir / "results.jsonl"
        found = records_label_space(read_result_records(results), str(results))
        if found is not None and found != self.label_space:
            raise UserError(f"{self.read_dir} holds accuracy-matrix cells measured with --label-space {found}; this "
                            f"run measures --label-space {self.label_space}: use another --save")

    def build(self) -> Run:
        """Check everything, then (and only then) take the save folder, create its log and config.yaml."""
        config = self.config
        prepared = self.prepare()
        if self.parallel.distributed:  # every check passed on this rank: join the others
            init_distributed(self.env)
        device, state = prepared.device, prepared.state
        announce_device(config.device, device)
        set_determinism(config.deterministic)
        configure_matmul(device, config.deterministic)
        seed_everything(config.seed)
        precision = self.precision
        chained = self.resumed is None and bool(state.completed)  # the next link of a one-task-per-process chain
        if self.save_dir is not None:
            self.lock = FolderLock(self.save_dir).acquire()  # one run per folder, until this process ends
            self.records = Records.for_run(self.save_dir, self.config_record, self.summary_label,
                                           getattr(config, "report_to", None) or [], self.save_dir.name)
            if self.resumed is not None:
                self.records.load_state_dict(self.resumed.get("records"))
            # trackers go on from a resumed checkpoint's step (replayed) or after a chain's --load's; a tracker that
            # cannot start is one line before mtil writes its own files
            self.records.start(resumed_at=state.global_step + 1 if chained else
                               state.global_step if self.resumed is not None else None)
        log = open_log(self.save_dir)
        if self.save_dir is not None:
            orphans = remove_orphaned_temporaries(self.save_dir)  # no live process's: we hold the folder
            if orphans:
                _say(log, f"removed {len(orphans)} temporary file(s) an interrupted write left: {', '.join(orphans)}")
            if self.repairs is not None:
                for warning in apply_repairs(self.save_dir, self.repairs, list(state.sequence)):
                    print(warning, file=sys.stderr)
                    log.warning(warning)
            typed = set(getattr(config, "_cli", ())) | set(getattr(config, "_file", ()))
            self.records.config(self.config_record, applied_settings(self.specs, self.settings), typed, DERIVED,
                                TASK_SETTINGS)
        self.parallel.barrier()  # rank 0 removed the orphans before another rank could read the folder
        evaluator = ZeroShotEvaluator(prepared.model, data_location=config.data_location, download=config.download,
                                      batch_size=config.batch_size_eval, workers=config.workers,
                                      max_size=config.max_evaluation_size,
                                      seed=config.seed if config.eval_sample_seed is None else config.eval_sample_seed,
                                      autocast_dtype=DTYPES[precision])
        evaluator.fewshot = protocol_of(config)
        evaluator.parallel = self.parallel
        evaluator.feature_store = store_of(config, precision)  # --feature-cache DIR (Tip-Adapter's), else None
        if getattr(config, "report", False) and self.save_dir is not None:
            self.reports = ReportWriter(self.save_dir / REPORTS_FOLDER, {
                "model": config.model, "load": config.load, "method": config.method, "train_mode": config.train_mode,
                "sequence": list(state.sequence)}).attach(evaluator)
        run = Run(config, prepared.model, prepared.arch, device, state, evaluator, self.save_dir, log,
                  precision=precision, parallel=self.parallel, records=self.records)
        run.zeroshot_state = ZeroShotWeights(state.base, config)
        if self.label_space == SEEN:  # the seam: a method's own task-agnostic head, else the union of heads
            evaluator.task_agnostic_head = lambda name, layout: self.method.task_agnostic_head(run, name, layout)
        # the saved weights' bounds: the zero-shot weights' largest values, the same for a straight run, a resumed
        # one and every link of a chain: the model itself at a fresh start, else rebuilt from the state's base (the
        # weights at hand if that cannot be)
        start = base_state_dict(run.model)
        if self.resumed is not None or state.completed:
            try:
                start = run.zeroshot_state()
            except (UserError, OSError):
                pass
        self.guard = WeightsGuard({f"model/{k}": v for k, v in start.items()})
        run.task_settings = {spec.dataset: settings for spec, settings in zip(self.specs, self.settings)}
        evaluator.learned_heads = run.heads
        for name, entry in prepared.heads.items():
            run.heads[name] = head_from_state(entry).to(device)
        if self.resumed is not None:
            for component in self.components:
                component.load_state_dict(self.resumed.get("methods", {}).get(component.name, {}))
        processes = f", {self.parallel.world_size} processes ({self.env.launcher}, {self.env.backend})" \
            if self.parallel.distributed else ""
        _say(log, f"mtil: {self.label} ({config.train_mode}) on {', '.join(state.sequence)}; model "
                  f"{prepared.source}; device {device}, precision {precision}, {torch.get_num_threads()} threads"
                  f"{processes}")
        for line in settings_lines(config, self.specs, self.settings, self.method.training_free):
            _say(log, line)
        return run

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
            "records": self.records.state_dict(),  # what was recorded at this step, replayed on resume
        }
        # every weight saved: the model's, the heads' (Tip-Adapter-F's keys, the embedding adapter), the methods'
        self.guard.check(list(payload_tensors({k: payload[k] for k in ("model", "heads", "methods")})),
                         "a checkpoint")
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
        state, protocol = run.state, run.evaluator.fewshot
        part = fewshot_report.matrix_part(protocol)
        if self.reports is not None:
            self.reports.begin_row(after_task, len(state.sequence), iteration=state.global_step)
        task = after_task if after_task is not None else len(state.completed) + 1  # mid-task: the one training
        # --label-space seen: among the classes of the tasks trained so far (mid-task: not the one training) too
        seen = seen_tasks(state.completed) if self.label_space == SEEN else None
        for name in self.eval_names(run):
            result = run.evaluator.evaluate(name, "test", part, seen=seen)
            rows.append({"after_task": after_task, "dataset": name, "top1": result.top1, "top5": result.top5})
            self.records.evaluation(result_record(
                dataset=name, iteration=state.global_step, after_task=after_task, sequence=state.completed,
                top1=result.top1, top5=result.top5, images=result.count, classes=result.classes, part=part,
                head=result.head, method=self.label, label_space=self.label_space), task)
            if protocol is not None and after_task is not None:
                fewshot_rows += fewshot_report.evaluate_extra(run.evaluator, protocol, name, result,
                                                              with_val=name in state.sequence, seen=seen)
        label = "zero-shot" if after_task == 0 else (f"after task {after_task}" if after_task else
                                                    f"step {state.step}")
        if seen is not None:
            label += ", label space seen"
        scores = "  ".join(f"{short_name(r['dataset'])} {r['top1']:.2f}" for r in rows)
        _say(run.log, f"[{label}] {scores or 'nothing to evaluate (--eval-datasets names classification datasets)'}")
        if fewshot_rows:
            _say(run.log, fewshot_report.format_line(label, fewshot_rows))
            self.records.fewshot(after_task, fewshot_rows)
        if self.reports is not None:
            self.reports.finish(self.eval_names(run), lambda line: _say(run.log, line))
        if after_task is not None:
            self.records.matrix_cells(rows, state.sequence)
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
            bias = logit_bias(run.model)  # SigLIP's trains with its scale
            if bias is not None:
                bias.requires_grad_(True)
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
        task.scheduler = warmup_cosine(task.optimizer, self._warmup(run, index, task), task.total_steps)
        task.scaler = grad_scaler(run.precision, run.device)
        return task

    def _warmup(self, run: Run, index: int, task: TaskContext) -> int:
        """The task's warm-up: as stated, or the default cut to a tenth of the task (said in a note). A task resumed
        mid-way keeps the warm-up it began with (one begun by an mtil before this rule, the flag's value)."""
        state, stated = run.state, task.settings.warmup_length
        if state.step > 0:
            return stated if state.warmup < 0 else state.warmup
        warmup = stated
        if not warmup_chosen(self.config, self.specs[index]):
            warmup = fair_warmup(stated, task.total_steps)
            if warmup < stated:
                _say(run.log, f"mtil: note: {short_name(task.name)}: the default warm-up of {stated} steps is longer than a "
                              f"tenth of the task's {task.total_steps} steps; {warmup} instead, so the lr reaches "
                              f"--lr (give --warmup-length N to choose)")
        state.warmup = warmup
        return warmup

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
        failed = True
        try:
            run = self.build()
            self._run_sequence(run)
            failed = False
            return run
        except Preempted:
            failed = False  # stopped on request, its checkpoint written: it resumes
            raise
        finally:
            self.records.close(failed)
            if self.lock is not None:
                self.lock.release()

    def _run_sequence(self, run: Run) -> None:
        state = run.state
        if state.finished:
            _say(run.log, f"{self.save_dir} already holds this finished run; nothing to resume")
            if self.reports is not None:  # re-run with --report: the final reports it lacks, from its final weights
                self.reports.catch_up(self.eval_names(run), lambda line: _say(run.log, line),
                                      after_task=len(state.completed), iteration=state.global_step)
        if self.read_dir is not None and resume.continues_chain(self.config, self.read_dir):
            # a chain's link (started or resumed): its tasks in the earlier links' rows
            own = [s.dataset for s in self.specs if s.dataset in self.eval_names(run)]
            if self.label_space == SEEN:  # the fill evaluates each dataset among its own classes only
                matrix = self.read_dir / MATRIX
                rows = run.state.sequence.index(self.specs[0].dataset) + 1
                if missing_cells(read_or_rebuild_matrix(matrix) if matrix.is_file() else None, rows, own):
                    _say(run.log, f"mtil: note: the earlier rows lack {', '.join(own)}; with --label-space seen a "
                                  f"chain's link does not fill them (give every task to --eval-datasets in each "
                                  f"link instead)")
            else:
                fill_earlier_rows(run, self.read_dir, own, self.specs[0].dataset, self.records, self.label,
                                  lambda line: _say(run.log, line))
        if not state.zero_shot_evaluated:
            self.evaluate_row(run, 0)
            state.zero_shot_evaluated = True
            self.save_latest(run, with_optimizer=False)
            self._stop_if_requested(run, "the zero-shot row")
        while not state.finished:
            if state.task_evaluated:
                self._train_one_task(run)
                self._stop_if_requested(run, f"task {len(state.completed)}")
            self.evaluate_row(run, len(state.completed))
            state.task_evaluated = True
            self.save_latest(run, with_optimizer=False)
            self._stop_if_requested(run, f"the row after task {len(state.completed)}")
        self.report(run)

    def _stop_if_requested(self, run: Run, where: str) -> None:
        """A stop request (SIGTERM, SIGUSR1, Ctrl-C) met between steps: a training-free task or an evaluation has
        no step to stop at. The checkpoint just written holds this point; every rank votes, so all stop together."""
        if run.state.finished or not self.parallel.any(self.stop.requested, run.device):
            return
        raise Preempted(f"stopped by {self.stop.signal_name or 'another process'} after {where}")

    def report(self, run: Run) -> None:
        trained = [name for name in run.state.sequence if name not in CAPTION_DATASETS]
        if self.records.final(trained, run.state.global_step, run.log) is None:
            return
        protocol = run.evaluator.fewshot
        if protocol is not None and (results := fewshot_report.final_results(self.save_dir)):
            _say(run.log, f"Few-shot protocol: {protocol.describe()}; at the end "
                          f"({fewshot_report.FEWSHOT_FILE}):\n{fewshot_report.format_table(results)}")
