"""Plans a run's stages and executes them into a run directory.

The plan is checked from the config alone, before any data is loaded: references between
stages, cycles, and each stage's own checks (:meth:`distillkit.stages.Stage.check`: tasks,
early-stopping metric, teachers that learned every task, ...). Only then is the data loaded,
its fingerprint taken and the stages' keys computed.

A stage's key hashes its config, the data (its fingerprint covers file contents), the split,
the student, its tasks, the name and version of every plugin whose components it uses, and
the keys of the stages it depends on. A stage whose folder holds the same key is skipped; a stage in
progress resumes from its last checkpoint; a finished stage is moved into place only when it
is complete, so a failed run never overwrites the results of an earlier good one. The run
directory's layout is :class:`distillkit.rundir.RunLayout`'s.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from distillkit import distributed
from distillkit.config import RunConfig
from distillkit.data import DataContext, prepare_splits
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.evaluation import summary_rows
from distillkit.feature_cache import check_frozen_encoders, frozen_encoder_params
from distillkit.interfaces import InputTransform
from distillkit.io import atomic_write_text, read_json, remove_stale_temporaries, write_json
from distillkit.progress import Reporter
from distillkit.registry import Registries
from distillkit.rundir import RunLayout, stage_marker
from distillkit.stages import PlanView, Stage, StageContext, StageResult
from distillkit.training import autocast_dtype

STAGE_FORMAT = "distillkit.stage/1"


@dataclass
class PlannedStage:
    name: str
    stage: Stage
    deps: list[str]
    key: str
    description: str


def build_stages(config: RunConfig, registries: Registries) -> dict[str, Stage]:
    return {name: registries.stage.get(p.kind)(name, p) for name, p in config.stages.items()}


def check_plan(config: RunConfig, registries: Registries) -> tuple[dict[str, Stage], list[str]]:
    """The stages and their order, from the config alone: reads no data.

    Every mistake is reported at once (unknown references, each stage's own checks); a cycle
    is reported once there are none.
    """
    stages = build_stages(config, registries)
    all_tasks = list(config.tasks)
    problems: list[str] = []
    run_es = getattr(config.training, "early_stopping", None)
    if run_es is not None and run_es.metric not in ("val_loss", "val_kd") \
            and run_es.metric.partition(".")[0] not in all_tasks:
        task = run_es.metric.partition(".")[0]
        problems.append(f"training.early_stopping.metric: '{run_es.metric}' must be val_loss, val_kd or "
                        f"<task>.<metric>, and '{task}' is not a task.{did_you_mean(task, all_tasks)} "
                        f"Tasks: {', '.join(all_tasks)}.")
    for name, stage in stages.items():
        for dep in stage.dependencies():
            if dep not in stages:
                problems.append(f"stages.{name}: refers to stage '{dep}', which does not exist."
                                f"{did_you_mean(dep, stages)} Stages: {', '.join(stages)}.")
            elif dep == name:
                problems.append(f"stages.{name}: depends on itself.")
    view = PlanView(config, stages, registries, tuple(frozen_encoder_params(config.student, registries)))
    for stage in stages.values():
        problems += stage.check(view)
    if problems:
        raise DistillkitError("invalid stages:\n" + "\n".join(f"  - {p}" for p in problems), where=config.file)
    return stages, _dependency_order(stages, config.file)


def _dependency_order(stages: dict[str, Stage], file: str) -> list[str]:
    """Stage names with every stage after the stages it depends on (depth first, config order)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join(chain[chain.index(name):] + [name])
            raise DistillkitError(f"the stages depend on each other in a cycle: {cycle}.", where=f"{file}: stages")
        state[name] = 1
        for dep in stages[name].dependencies():
            visit(dep, chain + [name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def plan(config: RunConfig, registries: Registries, data_fingerprint: str = "") -> list[PlannedStage]:
    """Check the plan (:func:`check_plan`) and key every stage in order."""
    stages, order = check_plan(config, registries)
    all_tasks = list(config.tasks)
    resolved = config.resolved()
    common = {"data": resolved["data"], "fingerprint": data_fingerprint, "split": resolved["split"],
              "student": resolved["student"], "seed": config.seed}
    keys: dict[str, str] = {}
    planned = []
    for name in order:
        stage = stages[name]
        # Only the tasks the stage touches: a teacher of {broad} is not retrained when the
        # caption's settings change, so runs that differ elsewhere share it.
        tasks = set(stage.key_tasks(all_tasks))
        desc = {"stage": resolved["stages"][name], "tasks": {t: resolved["tasks"][t] for t in sorted(tasks)},
                "deps": [keys[d] for d in stage.dependencies()], **common,
                # name -> version of every plugin whose components the stage uses: a new release
                # of one retrains the stage (and those after it) instead of keeping old results
                "plugins": registries.plugins_of(config.stages[name],
                                                 [config.tasks[t] for t in sorted(tasks) if t in config.tasks],
                                                 config.data, config.student)}
        keys[name] = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
        planned.append(PlannedStage(name, stage, stage.dependencies(), keys[name], stage.describe(all_tasks)))
    return planned


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillkitError(f"device '{name}' was requested but CUDA is not available.", where="device")
    return device


def check_mixed_precision(config: RunConfig, device: torch.device) -> None:
    """Every ``training.mixed_precision`` the device cannot run (fp16 on a CPU), named by its key,
    before any data is read; a stage that inherits the run's setting is reported once, at ``training``."""
    problems = []
    places = [("training", config.training)] + [(f"stages.{name}.training", getattr(params, "training", None))
                                                for name, params in config.stages.items()]
    for path, training in places:
        mode = getattr(training, "mixed_precision", "off")
        if path != "training" and mode == config.training.mixed_precision:
            continue
        try:
            autocast_dtype(mode, device, where=f"{path}.mixed_precision")
        except DistillkitError as exc:
            problems.append(f"{path}.mixed_precision: {exc.message}")
    if problems:
        raise DistillkitError(" ".join(problems), where=config.file)


def student_input_problems(config: RunConfig, tasks: dict, registries: Registries, splits: dict,
                           input_transform: Any) -> list[str]:
    """The student run on two rows of the data before any stage trains: an encoder that cannot
    read the inputs (``in_features: 3`` for rows of 4 numbers) is a config mistake to report
    now, naming the section, not a shape error in the middle of the first stage."""
    from distillkit.models import attach_input_transform, build_student

    rows = next((s.inputs[:2] for s in splits.values() if len(s) > 0), None)
    if rows is None:
        return []
    with torch.random.fork_rng(devices=[]):  # the stages' seeded initialisations stay as they are
        model = build_student(config.student, tasks, registries)
    attach_input_transform(model, input_transform)
    model.eval()
    try:
        with torch.no_grad():
            features = model.features(rows)
            for name, task in tasks.items():
                task.predict(model.heads[name], features)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        encoder = getattr(config.student, "encoder", None)
        named = f" with encoder {encoder.kind}" if hasattr(encoder, "kind") else ""
        shape = "x".join(str(n) for n in rows.shape[1:]) or "scalar"
        return [f"student: the student ({config.student.kind}{named}) cannot read this data's inputs "
                f"(one row: {shape}, {str(rows.dtype).replace('torch.', '')}): {reason}. Check the student's "
                f"settings against the data (e.g. student.encoder.in_features)."]
    return []


def check_processes(config: RunConfig, registries: Registries, processes: int) -> None:
    """What a run on ``processes`` ranks (torchrun, ``--nproc``) needs of the config, checked
    before any process starts and before any file is written: a device that exists (CUDA for
    NCCL, one GPU per process) and batches that give every process at least one row.

    A batch size that the processes do not divide is fine: the ranks take shards that differ
    by one row, and the losses are normalised over the global batch, so the gradient is the
    one process's (see docs/distributed.md).
    """
    if processes <= 1:
        return
    try:
        device = resolve_device(config.device)
    except DistillkitError as exc:
        raise DistillkitError(f"{exc.message} A run on {processes} GPU processes uses NCCL, which needs CUDA; "
                              f"set device: cpu (gloo) or auto.", where=f"{config.file}: device") from None
    problems = []
    if device.type == "cuda" and processes > torch.cuda.device_count():
        problems.append(f"device: {processes} processes need {processes} GPUs (one each), this machine has "
                        f"{torch.cuda.device_count()}.")
    places = [("training", config.training)] + [(f"stages.{name}.training", getattr(params, "training", None))
                                                for name, params in config.stages.items()]
    for path, training in places:
        size = getattr(training, "batch_size", None)
        if size is None or (path != "training" and size == config.training.batch_size):
            continue
        if size < processes:
            problems.append(f"{path}.batch_size: {size} rows per batch cannot be shared by {processes} processes "
                            f"(each needs at least one row of every batch); use at most {size} processes or a "
                            f"batch size of at least {processes}.")
    if problems:
        raise DistillkitError(" ".join(problems), where=config.file)


class RunLock:
    """An exclusive lock on a run directory; the OS drops it when the process dies."""

    def __init__(self, run_dir: Path):
        self.path = RunLayout(run_dir).lock
        self.fh = None

    def __enter__(self) -> "RunLock":
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise DistillkitError(f"another distillkit run ({holder}) is writing to this directory; "
                                  "wait for it to finish or choose another --out.", where=str(self.path.parent)) from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()}")
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


class Runner(StageContext):
    def __init__(self, config: RunConfig, registries: Registries, run_dir: Path, reporter: Reporter | None = None,
                 device: torch.device | None = None):
        #: the device to train on (under torchrun: this rank's); by default the config's
        self.requested_device = device
        self.config = config
        self.registries = registries
        self.run_dir = Path(run_dir)
        self.layout = RunLayout(self.run_dir)
        self.reporter = reporter or Reporter(quiet=True)
        self._results: dict[str, StageResult] = {}

    # StageContext ---------------------------------------------------------------------------
    def result(self, stage: str) -> StageResult:
        return self._results[stage]

    def callbacks(self, label: str):
        return self.reporter.callbacks(label)

    # -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        config = self.config
        cache_dir = Path(config.cache_dir or os.environ.get("DISTILLKIT_CACHE", Path.home() / ".cache" / "distillkit"))
        if not cache_dir.is_absolute():
            cache_dir = config.base_dir / cache_dir
        source_cls = self.registries.dataset.get(config.data.kind)
        self.cache_dir = cache_dir
        source = source_cls(config.data, DataContext(cache_dir=cache_dir, base_dir=config.base_dir, where="data"))
        self.data_fingerprint = source.fingerprint()
        started = time.perf_counter()
        dataset = source.load()
        self.tasks = {name: self.registries.task.get(p.kind)(name, p) for name, p in config.tasks.items()}
        self.splits = prepare_splits(dataset, config.split, self.tasks)
        self.input_transform = source.fit_input_transform(self.splits["train"].inputs)
        if self.input_transform is not None:
            InputTransform(self.input_transform, where=f"{config.data.kind}.fit_input_transform")  # checks it
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        self.reporter.message(f"data: {dataset.source}, {len(dataset)} items ({sizes}) "
                              f"in {time.perf_counter() - started:.1f}s")
        for name, task in self.tasks.items():
            self.reporter.message(f"  task {name}: {task.describe()}")

    def run(self, only: Sequence[str] | None = None) -> dict[str, Any]:
        # Under torchrun rank 0 alone creates and locks the run directory; every rank learns
        # whether it could, so that all stop cleanly when another run holds the lock.
        lock, error = None, None
        if distributed.is_main():
            try:
                lock = self._lock()
            except DistillkitError as exc:
                error = exc
        distributed.raise_if_any(error)
        try:
            return self._run(only)
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)

    def _lock(self) -> RunLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise DistillkitError(f"--out {self.run_dir} is a file, not a directory.", where="--out")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DistillkitError(f"cannot create the run directory {self.run_dir}: {exc.strerror}.", where="--out") from None
        lock = RunLock(self.run_dir).__enter__()
        remove_stale_temporaries(self.run_dir)  # left by a run killed mid-write
        return lock

    def _run(self, only: Sequence[str] | None) -> dict[str, Any]:
        # Everything the config alone can show is checked before any data is read.
        self.device = self.requested_device or resolve_device(self.config.device)
        check_mixed_precision(self.config, self.device)
        check_frozen_encoders(self.config.student, self.registries, self.config.file)
        check_plan(self.config, self.registries)
        # rank 0 first: a dataset source may fill its cache (decoded images) while it loads
        distributed.main_first(self.prepare_data)
        main = distributed.is_main()
        planned = plan(self.config, self.registries, self.data_fingerprint)
        problems = [p for step in planned for p in step.stage.check_data(self)]
        problems += student_input_problems(self.config, self.tasks, self.registries, self.splits,
                                           self.input_transform)
        if problems:
            raise DistillkitError("invalid stages:\n" + "\n".join(f"  - {p}" for p in problems),
                                  where=self.config.file)
        # config.yaml, plan.json and run.json describe the results in this folder: a new run
        # writes them at once, a run over earlier results only when all its stages are done,
        # so a failed run never replaces the description of an earlier good one.
        if main and not self.layout.config.exists():
            self._write_description(planned)
        self.reporter.message(f"device: {self.device}; run directory: {self.run_dir}")
        for i, step in enumerate(planned, 1):
            marker = self.layout.stage_marker(step.name)
            if marker.exists():
                saved = read_json(marker)
                if saved.get("key") == step.key and saved.get("status") == "done":
                    self._results[step.name] = StageResult.from_json(saved["result"])
                    self.reporter.stage_skipped(step.name)
                    continue
            if only is not None and step.name not in only:
                raise DistillkitError(f"stage '{step.name}' must run before {', '.join(only)}.")
            work = self.layout.work(step.name, step.key)
            if main:
                work.mkdir(parents=True, exist_ok=True)
            self.reporter.stage_start(i, len(planned), step.name, step.description)
            started = time.perf_counter()
            result = step.stage.run(self, work)
            seconds = time.perf_counter() - started
            # the stage's folder moves into place before any rank reads its models
            result = distributed.broadcast_object(
                distributed.main_only(lambda: self._relocate(result, work, step.name, step.key, seconds)))
            self._results[step.name] = result
            if main:
                self._write_metrics(planned)
            self.reporter.stage_end(step.name, time.perf_counter() - started)
        if not main:
            return {}
        self._write_description(planned)
        summary = self._write_metrics(planned)
        self._show_summary(planned)
        return summary

    def _write_description(self, planned: list[PlannedStage]) -> None:
        atomic_write_text(self.layout.config, yaml.safe_dump(self.config.resolved(), sort_keys=False))
        entries = []
        for p in planned:
            entry = {"name": p.name, "key": p.key, "deps": p.deps, "description": p.description}
            search = self._results[p.name].metrics.get("temperature_search") if p.name in self._results else None
            if search:  # temperature: auto, once chosen on the validation split
                entry["temperature_chosen"] = search["chosen"]
            entries.append(entry)
        write_json(self.layout.plan, entries)
        # Relative paths in config.yaml (e.g. a manifest) resolve against this folder.
        write_json(self.layout.info, {"config_file": str(Path(self.config.file).resolve()),
                                               "base_dir": str(self.config.base_dir.resolve()),
                                               "data_fingerprint": self.data_fingerprint})

    def _relocate(self, result: StageResult, work: Path, name: str, key: str, seconds: float) -> StageResult:
        """Move a finished stage's folder into place, keeping the previous one until then.

        ``stage.json`` is written before the move, so a stage folder in place always holds
        its marker; a crash between the two renames leaves the work folder, which resumes.
        """
        final = self.layout.stage(name)
        prefix = str(work.relative_to(self.run_dir))
        target = str(final.relative_to(self.run_dir))
        for model in result.models:
            if model.path.startswith(prefix):
                model.path = target + model.path[len(prefix):]
        write_json(stage_marker(work), {"format": STAGE_FORMAT, "key": key, "status": "done",
                                         "seconds": seconds, "result": result.to_json()})
        previous = self.layout.previous(name)
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            previous.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, previous)
        os.replace(work, final)
        return result

    def _write_metrics(self, planned: list[PlannedStage]) -> dict[str, Any]:
        """Every finished stage's metrics: this run's, then any other stage folder in place.

        Reading the folders keeps metrics.json true to them when a re-run stops half-way:
        the stages it did not reach keep their earlier, good results there too.
        """
        metrics = {p.name: self._results[p.name].metrics for p in planned if p.name in self._results}
        for marker in self.layout.finished_markers():
            name = marker.parent.name
            if name not in metrics:
                saved = read_json(marker)
                if saved.get("status") == "done":
                    metrics[name] = saved["result"]["metrics"]
        write_json(self.layout.metrics, metrics)
        return metrics

    def _show_summary(self, planned: list[PlannedStage]) -> None:
        for step in planned:
            if step.stage.params.kind != "evaluate" or step.name not in self._results:
                continue
            split = step.stage.params.split
            by_model = self._results[step.name].metrics.get(split, {})
            header, rows = summary_rows(by_model, self.tasks)
            write_json(self.layout.summary, {"stage": step.name, "split": split, "header": header,
                                                       "rows": rows})
            self.reporter.table(f"{self.config.name}: {split} metrics ({step.name})", header, rows)


def describe_plan(planned: list[PlannedStage]) -> list[str]:
    lines = []
    for i, p in enumerate(planned, 1):
        deps = f"  (after {', '.join(p.deps)})" if p.deps else ""
        lines.append(f"{i}. {p.name}: {p.description}{deps}")
    return lines
