"""Stage kinds: ``train``, ``ensemble``, ``distill`` and ``evaluate``.

A stage reads the run's data and the models of earlier stages and writes its own folder:
``model.safetensors`` (or one folder per model), ``metrics.json`` and ``log.jsonl``.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import torch
from pydantic import Field, field_validator

from distillkit.checkpoint import file_checksum, save_model
from distillkit.data import SplitData, hash_seed
from distillkit.errors import DistillkitError
from distillkit.feature_cache import FeatureCache, FrozenPrefix, reading_features
from distillkit.interfaces import Encoder, Params, Student, Task, Teacher
from distillkit.io import read_json, write_json
from distillkit.models import as_teacher, build_student, init_from, load_model, model_meta
from distillkit.teacher_targets import (OnlineTargets, TeacherOutputParams, build_or_load_cache, cache_key,
                                        route_teachers)
from distillkit.training import evaluate, fit


@dataclass
class ModelRecord:
    path: str  # relative to the run dir
    tasks: list[str]
    scores: dict[str, float]
    checksum: str
    label: str


@dataclass
class StageResult:
    models: list[ModelRecord] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # split -> model label -> task -> metrics

    def to_json(self) -> dict[str, Any]:
        return {"models": [vars(m) for m in self.models], "metrics": self.metrics}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StageResult":
        return cls([ModelRecord(**m) for m in data["models"]], dict(data["metrics"]))


class StageContext(ABC):
    """What a stage can use; implemented by the runner."""

    config: Any
    registries: Any
    tasks: dict[str, Task]
    splits: dict[str, SplitData]
    device: torch.device
    run_dir: Path
    data_fingerprint: str
    #: the shared data cache (decoded images, frozen features)
    cache_dir: Path

    @abstractmethod
    def result(self, stage: str) -> StageResult: ...

    @abstractmethod
    def callbacks(self, label: str) -> Any: ...

    def frozen_views(self, encoder: Encoder, names: Sequence[str], storage: str,
                     batch_size: int) -> dict[str, SplitData] | None:
        """The named splits as ``encoder``'s trainable blocks read them: the cached output
        of its frozen part, row for row; ``None`` when it freezes nothing or the cache is off."""
        if storage == "off" or not encoder.frozen_blocks:
            return None
        cache = FeatureCache(self.cache_dir / "features", self.data_fingerprint, storage, batch_size, self.device,
                             progress=self.callbacks,
                             plugins=self.registries.plugins_of(getattr(encoder, "params", None)))
        return {name: cache.view(encoder, self.splits[name]) for name in names}

    def teachers(self, stages: Sequence[str]) -> list[Teacher]:
        out = []
        for stage in stages:
            for record in self.result(stage).models:
                loaded = load_model(self.run_dir / record.path, self.registries, self.device)
                out.append(as_teacher(loaded, record.label, record.scores))
        return out


class Stage(ABC):
    Params: ClassVar[type[Params]]
    #: the stage has a ``training`` section merged over the run's defaults
    uses_training: ClassVar[bool] = False
    #: nested component fields -> registry kind
    nested: ClassVar[dict[str, str]] = {}

    def __init__(self, name: str, params: Params):
        self.name = name
        self.params = params

    def dependencies(self) -> list[str]:
        return []

    def task_names(self, all_tasks: Sequence[str]) -> list[str]:
        tasks = getattr(self.params, "tasks", None)
        return list(tasks) if tasks else list(all_tasks)

    def model_task_sets(self, all_tasks: Sequence[str]) -> list[frozenset[str]]:
        """The task sets of the models this stage produces (for routing checks)."""
        return [frozenset(self.task_names(all_tasks))]

    @abstractmethod
    def describe(self, all_tasks: Sequence[str]) -> str: ...

    @abstractmethod
    def run(self, ctx: StageContext, workdir: Path) -> StageResult: ...


# -- shared pieces -------------------------------------------------------------------------

def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _primary_scores(tasks: Mapping[str, Task], metrics: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(metrics.get(name, {}).get(task.primary_metric, math.nan)) for name, task in tasks.items()}


def _evaluate_splits(ctx: StageContext, model, tasks, loss_fn, batch_size: int,
                     splits: Mapping[str, SplitData]) -> dict[str, Any]:
    return {split: evaluate(model, tasks, splits[split], batch_size, ctx.device, loss_fn)
            for split in ("val", "test")}


def _train_one(ctx: StageContext, stage: str, label: str, task_names: Sequence[str], params: Any, workdir: Path,
               init: str | None, teachers: list[Teacher] | None = None) -> tuple[ModelRecord, dict[str, Any]]:
    """Train (or distill into) one student and save it; the common core of every training stage."""
    tasks = {t: ctx.tasks[t] for t in task_names}
    seed = ctx.config.seed
    torch.manual_seed(hash_seed(seed, stage, label, "init"))
    model = build_student(ctx.config.student, tasks, ctx.registries)
    if init is not None:
        record = ctx.result(init).models[0]
        init_from(model, ctx.run_dir / record.path, where=f"stages.{stage}.init")
    model.to(ctx.device)
    loss_fn = ctx.registries.loss.get(params.loss.kind)(params.loss)
    training = params.training
    meta = model_meta(ctx.config.student, tasks, stage, inputs=ctx.splits["train"].inputs)
    train_name = "unlabeled" if teachers is not None and params.data == "unlabeled" else "train"
    if teachers is not None and len(ctx.splits[train_name]) == 0:
        raise DistillkitError(f"stage '{stage}' distills on the {params.data} split, which is empty.",
                              where=f"stages.{stage}.data")
    # With a frozen encoder part the student trains and is evaluated on its cached output.
    views = ctx.frozen_views(model.encoder, (train_name, "val", "test"), training.feature_cache,
                             training.eval_batch_size)
    splits = views or ctx.splits
    readers = [model] if views else []
    kw: dict[str, Any] = {}
    if teachers is not None:
        kw = _distill_inputs(ctx, stage, params, tasks, teachers, model, splits, readers)
    if training.augment is not None:
        kw["augment"] = ctx.registries.augmentation.get(training.augment.kind)(training.augment)
    path = workdir / "model.safetensors"
    with reading_features(readers):
        fit(model, tasks, loss_fn, splits[train_name], splits["val"], training, device=ctx.device,
            seed=hash_seed(seed, stage, label), workdir=workdir, callbacks=ctx.callbacks(label), stage=stage,
            model_meta=meta, **kw)
        save_model(path, model, meta)  # whole: the frozen weights travel with it
        metrics = _evaluate_splits(ctx, model, tasks, loss_fn, training.eval_batch_size, splits)
    record = ModelRecord(path=str(path.relative_to(ctx.run_dir)), tasks=list(task_names),
                         scores=_primary_scores(tasks, metrics["val"]), checksum=file_checksum(path), label=label)
    return record, metrics


def _distill_inputs(ctx: StageContext, stage: str, params: Any, tasks: Mapping[str, Task], teachers: list[Teacher],
                    student: Student, splits: Mapping[str, SplitData], readers: list[Student]) -> dict[str, Any]:
    """fit()'s teacher arguments. When the student reads cached frozen features (``splits``
    are its views), a teacher with the same frozen part reads them too (it joins ``readers``);
    any other teacher reads the raw inputs of the same rows."""
    tau = params.temperature_for(list(tasks))
    policy = ctx.registries.aggregation.get(params.aggregation.kind)(params.aggregation)
    routes = route_teachers(list(tasks), teachers, policy, where=f"stages.{stage}.teachers")
    use_labels = params.data == "labeled"
    train_name = "unlabeled" if not use_labels else "train"
    raw: list[int] = []
    if readers:
        prefix = FrozenPrefix.of(student.encoder)
        raw = [i for i, t in enumerate(teachers) if FrozenPrefix.of(t.model.encoder) != prefix]
        readers += [t.model for i, t in enumerate(teachers) if i not in raw]
    online = OnlineTargets(teachers, tasks, routes, tau, use_labels, ctx.splits[train_name].inputs, raw)
    # Validation targets never use labels in an unlabeled stage (they feed ``val_kd``).
    val_online = OnlineTargets(teachers, tasks, routes, tau, False, ctx.splits["val"].inputs, raw)
    out = params.teacher_outputs
    batch = params.training.eval_batch_size
    if out.mode == "online":
        train_targets, val_targets = online, val_online
    else:
        cache_root = ctx.run_dir / "cache" / "teacher_outputs"
        # the plugins whose code turns the teachers' weights into soft targets
        code = ctx.registries.plugins_of(params.aggregation, *[task.params for task in tasks.values()],
                                         *[t.model for t in teachers],
                                         *[getattr(t.model.encoder, "params", None) for t in teachers])
        # fp16 frozen features give teachers slightly other inputs than raw images or fp32 features
        view = "frozen-fp16" if readers and params.training.feature_cache == "fp16" else "identity"
        targets = []
        for split, source in ((splits[train_name], online), (splits["val"], val_online)):
            key = cache_key(teachers, routes, tau, source.use_labels, split, ctx.data_fingerprint, out, view, code)
            with reading_features(readers):
                targets.append(build_or_load_cache(source, split, cache_root / key, out, batch, ctx.device,
                                                   progress=ctx.callbacks(f"teacher outputs ({split.name})")))
        train_targets, val_targets = targets
    return {"use_labels": use_labels, "soft_targets": train_targets, "val_soft_targets": val_targets,
            "alpha": params.alpha if use_labels else 1.0, "tau": tau}


def _check_task_states(teachers: Sequence[Teacher], tasks: Mapping[str, Task], where: str) -> None:
    """A teacher fitted on other labels (a checkpoint from another data set) has outputs over
    other classes or words than the student's: refuse it by name rather than fail on shapes."""
    for teacher in teachers:
        for name in sorted(teacher.tasks & set(tasks)):
            theirs, ours = teacher.task_states.get(name), tasks[name].state()
            if theirs is None or theirs == ours:
                continue
            key = next(k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
            a, b = theirs.get(key), ours.get(key)
            detail = (f"its {key}: {len(a)} entries, this run's: {len(b)}" if isinstance(a, list) and isinstance(b, list)
                      and len(a) != len(b) else f"its {key} differ from this run's")
            raise DistillkitError(f"teacher '{teacher.name}' learned task '{name}' from other labels than this run "
                                  f"({detail}), so its outputs do not match the student's.", where=where)


def _default_loss() -> dict[str, Any]:
    return {"kind": "kd"}


# -- stage kinds ---------------------------------------------------------------------------

class TrainParams(Params):
    kind: str = "train"
    #: tasks the model learns (default: every task of the run)
    tasks: Optional[list[str]] = None
    #: start from the weights of this earlier stage's model
    init: Optional[str] = None
    loss: Any = Field(default_factory=_default_loss)
    training: Any = None


class TrainStage(Stage):
    """Supervised multi-task training on the labeled training split (the paper's M1)."""

    Params = TrainParams
    uses_training = True
    nested = {"loss": "loss"}

    def dependencies(self) -> list[str]:
        return [self.params.init] if self.params.init else []

    def describe(self, all_tasks: Sequence[str]) -> str:
        init = f" from {self.params.init}" if self.params.init else ""
        return f"train on labeled data: tasks {', '.join(self.task_names(all_tasks))}{init}"

    def run(self, ctx: StageContext, workdir: Path) -> StageResult:
        record, metrics = _train_one(ctx, self.name, self.name, self.task_names(list(ctx.tasks)), self.params,
                                     workdir, self.params.init)
        return StageResult([record], {split: {record.label: m} for split, m in metrics.items()})


class EnsembleParams(Params):
    kind: str = "ensemble"
    tasks: Optional[list[str]] = None
    #: ``all``: every non-empty subset of the tasks (2^n - 1 models); ``proper``: all but the
    #: full set (when the full-task model is trained by another stage); or an explicit list
    subsets: Union[Literal["all", "proper"], list[list[str]]] = "all"
    loss: Any = Field(default_factory=_default_loss)
    training: Any = None


class EnsembleStage(Stage):
    """Trains one teacher per subset of the tasks (the paper's seven-teacher ensemble)."""

    Params = EnsembleParams
    uses_training = True
    nested = {"loss": "loss"}

    def subsets(self, all_tasks: Sequence[str]) -> list[list[str]]:
        tasks = self.task_names(all_tasks)
        if isinstance(self.params.subsets, list):
            return [list(s) for s in self.params.subsets]
        combos = [list(c) for r in range(1, len(tasks) + 1) for c in itertools.combinations(tasks, r)]
        if self.params.subsets == "proper":
            combos = combos[:-1]
        return combos

    def model_task_sets(self, all_tasks: Sequence[str]) -> list[frozenset[str]]:
        return [frozenset(s) for s in self.subsets(all_tasks)]

    def describe(self, all_tasks: Sequence[str]) -> str:
        subsets = " ".join("{" + ",".join(s) + "}" for s in self.subsets(all_tasks))
        return f"train {len(self.subsets(all_tasks))} teachers on labeled data: {subsets}"

    def run(self, ctx: StageContext, workdir: Path) -> StageResult:
        result = StageResult()
        for subset in self.subsets(list(ctx.tasks)):
            label = f"{self.name}[{'+'.join(subset)}]"
            sub = workdir / "+".join(subset)
            done = sub / "done.json"
            if done.exists():  # a finished teacher survives an interrupted ensemble
                saved = read_json(done)
                record, metrics = ModelRecord(**saved["record"]), saved["metrics"]
            else:
                record, metrics = _train_one(ctx, self.name, label, subset, self.params, sub, None)
                write_json(done, {"record": vars(record), "metrics": metrics})
            result.models.append(record)
            for split, m in metrics.items():
                result.metrics.setdefault(split, {})[label] = m
        return result


class DistillParams(Params):
    kind: str = "distill"
    tasks: Optional[list[str]] = None
    init: Optional[str] = None
    #: stages whose models teach (a train stage gives one teacher, an ensemble several)
    teachers: list[str] = Field(default_factory=list)
    #: teachers from outside the run, e.g. ``{kind: checkpoint, path: teacher.safetensors}``
    extra_teachers: list[Any] = Field(default_factory=list)
    #: ``labeled``: CE to the labels plus KL to the teachers on the training split (M2);
    #: ``unlabeled``: KL only, on the unlabeled pool (M3)
    data: Literal["labeled", "unlabeled"] = "labeled"
    #: weight of the soft term (the paper: 0.95)
    alpha: float = Field(0.95, ge=0, le=1)
    #: tau, one value or one per task (the paper's grid: 0.5, 1, 5, 10); ``auto`` (for all tasks
    #: or per task) chooses it from ``temperature_grid`` on the validation split, greedily one
    #: task at a time in the stage's task order
    temperature: Union[float, Literal["auto"], dict[str, Union[float, Literal["auto"]]]] = 1.0
    temperature_grid: list[float] = Field(default_factory=lambda: [0.5, 1.0, 5.0, 10.0], min_length=1)
    aggregation: Any = Field(default_factory=lambda: {"kind": "mean"})
    teacher_outputs: TeacherOutputParams = TeacherOutputParams()
    loss: Any = Field(default_factory=_default_loss)
    training: Any = None

    @field_validator("temperature")
    @classmethod
    def _positive(cls, value):
        values = value.values() if isinstance(value, dict) else [value]
        if any(v != "auto" and v <= 0 for v in values):
            raise ValueError("temperatures must be > 0 or auto")
        return value

    @field_validator("temperature_grid")
    @classmethod
    def _positive_grid(cls, value):
        if any(v <= 0 for v in value):
            raise ValueError("temperatures must be > 0")
        return value

    def auto_tasks(self, tasks: Sequence[str]) -> list[str]:
        """The tasks whose temperature is chosen on the validation split, in task order."""
        if isinstance(self.temperature, dict):
            return [t for t in tasks if self.temperature.get(t) == "auto"]
        return list(tasks) if self.temperature == "auto" else []

    def temperature_for(self, tasks: Sequence[str]) -> dict[str, float | str]:
        if isinstance(self.temperature, dict):
            return {t: self.temperature.get(t, 1.0) for t in tasks}
        return {t: self.temperature for t in tasks}


class DistillStage(Stage):
    """Knowledge distillation from one or more earlier stages' models (the paper's M2 and M3)."""

    Params = DistillParams
    uses_training = True
    nested = {"aggregation": "aggregation", "loss": "loss", "extra_teachers": "teacher"}

    def dependencies(self) -> list[str]:
        deps = ([self.params.init] if self.params.init else []) + list(self.params.teachers)
        return list(dict.fromkeys(deps))

    def describe(self, all_tasks: Sequence[str]) -> str:
        p = self.params
        init = f" from {p.init}" if p.init else ""
        tau = p.temperature_for(self.task_names(all_tasks))
        grid = "/".join(f"{g:g}" for g in p.temperature_grid)
        taus = ", ".join(f"{k}={v:g}" if v != "auto" else f"{k}=auto({grid}, on val)" for k, v in tau.items())
        return (f"distill on {p.data} data{init}: tasks {', '.join(self.task_names(all_tasks))}; teachers "
                f"{', '.join(p.teachers)} ({p.aggregation.kind}); alpha={p.alpha if p.data == 'labeled' else 1.0:g}; "
                f"tau {taus}; teacher outputs {p.teacher_outputs.mode}/{p.teacher_outputs.storage}")

    def run(self, ctx: StageContext, workdir: Path) -> StageResult:
        teachers = ctx.teachers(self.params.teachers)
        for spec in self.params.extra_teachers:
            source = ctx.registries.teacher.get(spec.kind)(spec)
            teachers.append(source.load(ctx.registries, ctx.device, ctx.config.base_dir))
        if not teachers:
            raise DistillkitError(f"stage '{self.name}' has no teachers.", where=f"stages.{self.name}.teachers")
        _check_task_states(teachers, ctx.tasks, where=f"stages.{self.name}")
        task_names = self.task_names(list(ctx.tasks))
        params, search = self._choose_temperatures(ctx, workdir, task_names, teachers)
        record, metrics = _train_one(ctx, self.name, self.name, task_names, params,
                                     workdir, self.params.init, teachers=teachers)
        result = StageResult([record], {split: {record.label: m} for split, m in metrics.items()})
        if search:
            result.metrics["temperature_search"] = search
        return result

    def _choose_temperatures(self, ctx: StageContext, workdir: Path, task_names: Sequence[str],
                             teachers: list[Teacher]) -> tuple[DistillParams, dict[str, Any]]:
        """``temperature: auto``: for each auto task in turn, distill once per candidate tau (the
        tasks chosen so far fixed, the later auto tasks at 1) and keep the tau with the best
        validation score of that task's primary metric. The test split is never read."""
        auto = self.params.auto_tasks(task_names)
        if not auto:
            return self.params, {}
        chosen = {t: (1.0 if v == "auto" else float(v)) for t, v in self.params.temperature_for(task_names).items()}
        scores: dict[str, dict[str, float]] = {}
        for task in auto:
            scores[task] = {}
            for tau in self.params.temperature_grid:
                trial = self.params.model_copy(update={"temperature": {**chosen, task: float(tau)}})
                folder = workdir / "temperature_search" / f"{task}-{tau:g}"
                folder.mkdir(parents=True, exist_ok=True)
                record, _ = _train_one(ctx, self.name, self.name, task_names, trial, folder, self.params.init,
                                       teachers=teachers)
                scores[task][f"{tau:g}"] = record.scores[task]  # the validation split's primary metric
            best = max(self.params.temperature_grid,
                       key=lambda tau: (_finite(scores[task][f"{tau:g}"]), -abs(math.log(tau))))
            chosen[task] = float(best)
        final = self.params.model_copy(update={"temperature": dict(chosen)})
        return final, {"chosen": {t: chosen[t] for t in auto}, "grid": list(self.params.temperature_grid),
                       "split": "val", "scores": scores}


class EvaluateParams(Params):
    kind: str = "evaluate"
    #: stages whose models are compared (rows of the table)
    models: list[str] = Field(min_length=1)
    split: Literal["val", "test"] = "test"
    #: also report every metric per value of this task's label (e.g. per broad disease)
    group_by: Optional[str] = None
    batch_size: int = Field(256, ge=1)


class EvaluateStage(Stage):
    """Evaluates earlier stages' models on one split and writes the comparison table."""

    Params = EvaluateParams

    def dependencies(self) -> list[str]:
        return list(self.params.models)

    def model_task_sets(self, all_tasks):
        return []

    def describe(self, all_tasks: Sequence[str]) -> str:
        by = f", per {self.params.group_by}" if self.params.group_by else ""
        return f"evaluate {', '.join(self.params.models)} on the {self.params.split} split{by}"

    def run(self, ctx: StageContext, workdir: Path) -> StageResult:
        from distillkit.evaluation import evaluate_grouped

        result = StageResult()
        for stage in self.params.models:
            for record in ctx.result(stage).models:
                loaded = load_model(ctx.run_dir / record.path, ctx.registries, ctx.device)
                # the run's fitted tasks carry the split's encoding; the model's own tasks its head sizes
                tasks = {name: ctx.tasks[name] for name in loaded.tasks}
                views = ctx.frozen_views(loaded.model.encoder, [self.params.split],
                                         ctx.config.training.feature_cache, self.params.batch_size)
                split = views[self.params.split] if views else ctx.splits[self.params.split]
                with reading_features([loaded.model] if views else []):
                    metrics = evaluate(loaded.model, tasks, split, self.params.batch_size, ctx.device)
                    if self.params.group_by:
                        metrics["by_group"] = evaluate_grouped(loaded.model, tasks, split, self.params.group_by,
                                                               ctx.tasks[self.params.group_by],
                                                               self.params.batch_size, ctx.device)
                result.metrics.setdefault(self.params.split, {})[record.label] = metrics
        write_json(workdir / "metrics.json", result.metrics)
        return result
