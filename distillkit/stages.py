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
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Sequence, Union

import torch
from pydantic import Field, field_validator

from distillkit import distributed
from distillkit.checkpoint import file_checksum, save_model
from distillkit.data import SplitData, hash_seed
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.feature_cache import FeatureCache, FrozenPrefix, reading_features
from distillkit.interfaces import Encoder, Params, Student, Task, Teacher
from distillkit.io import read_json, write_json
from distillkit.metric_direction import direction, oriented
from distillkit.models import as_teacher, attach_input_transform, build_student, init_from, load_model, model_meta
from distillkit.rundir import RunLayout
from distillkit.schema import Component, NestedComponents, StageTraining
from distillkit.teacher_targets import (OnlineTargets, TeacherOutputParams, build_or_load_cache, cache_key,
                                        route_teachers)
from distillkit.training import Member, evaluate, fit, fit_together


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
    #: the input transform fitted on the training split (``shift``/``scale``), or ``None``
    input_transform: Mapping[str, Any] | None = None

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
        # Under torchrun the ranks compute the features in turn; rank 0 writes them once.
        return {name: cache.view(encoder, self.splits[name]) for name in names}

    def teachers(self, stages: Sequence[str]) -> list[Teacher]:
        out = []
        for stage in stages:
            for record in self.result(stage).models:
                loaded = load_model(self.run_dir / record.path, self.registries, self.device)
                out.append(as_teacher(loaded, record.label, record.scores))
        return out


@dataclass(frozen=True)
class PlanView:
    """What :meth:`Stage.check` sees: the run's config and every stage, and no data."""

    config: Any
    stages: Mapping[str, "Stage"]
    registries: Any
    #: student fields whose encoder freezes blocks (``student.encoder`` ...)
    frozen: Sequence[str] = ()

    def task_class(self, task: str) -> type[Task]:
        return self.registries.task.get(self.config.tasks[task].kind)

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)


class Stage(ABC):
    Params: ClassVar[type[Params]]
    #: ``{field: registry kind}`` of the nested components of :attr:`Params`, read from their
    #: annotations (``loss: Annotated[Any, Component("loss")]``); read-only
    nested: ClassVar[dict[str, str]] = NestedComponents()  # type: ignore[assignment]

    def __init__(self, name: str, params: Params):
        self.name = name
        self.params = params

    def dependencies(self) -> list[str]:
        return []

    def task_names(self, all_tasks: Sequence[str]) -> list[str]:
        tasks = getattr(self.params, "tasks", None)
        return list(tasks) if tasks else list(all_tasks)

    def key_tasks(self, all_tasks: Sequence[str]) -> list[str]:
        """The tasks whose config goes into the stage's key (by default the tasks it learns)."""
        return self.task_names(all_tasks)

    def model_task_sets(self, all_tasks: Sequence[str]) -> list[frozenset[str]]:
        """The task sets of the models this stage produces (for routing checks)."""
        return [frozenset(self.task_names(all_tasks))]

    def check(self, plan: PlanView) -> list[str]:
        """Mistakes in this stage's config that need no data, one ``stages.<name>...: ...`` line each.

        Called by the planner (``distillkit run`` and ``validate``) on every stage before any data
        is loaded, after references to unknown stages were collected: a stage named in
        ``dependencies()`` may be missing from ``plan.stages``. The planner reports all lines
        at once and orders the stages only when there are none. The base class checks the
        stage's ``tasks`` and ``training``; subclasses extend the list.
        """
        problems = []
        for task in getattr(self.params, "tasks", None) or []:
            if task not in plan.tasks:
                problems.append(f"stages.{self.name}.tasks: unknown task '{task}'.{did_you_mean(task, plan.tasks)} "
                                f"Tasks: {', '.join(plan.tasks)}.")
        training = getattr(self.params, "training", None)
        es = getattr(training, "early_stopping", None)
        own = self.task_names(plan.tasks)
        run_es = getattr(getattr(plan.config, "training", None), "early_stopping", None)
        # the run's own metric naming no task of the run is reported once, at training.early_stopping
        inherited_unknown = (run_es is not None and es is not None and es.metric == run_es.metric
                             and es.metric.partition(".")[0] not in plan.tasks)
        if (es is not None and es.metric not in ("val_loss", "val_kd") and es.metric.partition(".")[0] not in own
                and not inherited_unknown):
            problems.append(f"stages.{self.name}.training.early_stopping.metric: '{es.metric}' must be val_loss, "
                            f"val_kd or <task>.<metric> for one of the stage's tasks ({', '.join(own)}).")
        if (plan.frozen and getattr(training, "augment", None) is not None
                and getattr(training, "feature_cache", "off") != "off"):
            problems.append(f"stages.{self.name}.training.augment: random augmentation changes what the frozen "
                            f"encoder blocks ({', '.join(f'student.{f}.freeze' for f in plan.frozen)}) see at every "
                            f"step, which their feature cache cannot hold; set stages.{self.name}.training."
                            f"feature_cache: off (or remove the augmentation).")
        return problems

    def check_data(self, ctx: StageContext) -> list[str]:
        """Mistakes that show only once the data is loaded (``ctx.splits`` and ``ctx.tasks`` are
        ready), e.g. a field the data does not have; called on every stage before the first runs."""
        return []

    @abstractmethod
    def describe(self, all_tasks: Sequence[str]) -> str: ...

    @abstractmethod
    def run(self, ctx: StageContext, workdir: Path) -> StageResult: ...


# -- shared pieces -------------------------------------------------------------------------

def _score(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _primary_scores(tasks: Mapping[str, Task], metrics: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(metrics.get(name, {}).get(task.primary_metric, math.nan)) for name, task in tasks.items()}


def _evaluate_splits(ctx: StageContext, model, tasks, loss_fn, batch_size: int,
                     splits: Mapping[str, SplitData]) -> dict[str, Any]:
    return {split: evaluate(model, tasks, splits[split], batch_size, ctx.device, loss_fn)
            for split in ("val", "test")}


def _train_one(ctx: StageContext, stage: str, label: str, task_names: Sequence[str], params: Any, workdir: Path,
               init: str | None, teachers: list[Teacher] | None = None,
               batch_seed: int | None = None) -> tuple[ModelRecord, dict[str, Any]]:
    """Train (or distill into) one student and save it; the common core of every training stage."""
    one = _prepare_one(ctx, stage, label, task_names, params, init, teachers)
    with reading_features(one.readers):
        fit(one.model, one.tasks, one.loss_fn, one.splits[one.train_name], one.splits["val"], params.training,
            device=ctx.device, seed=hash_seed(ctx.config.seed, stage, label), workdir=workdir,
            callbacks=ctx.callbacks(label), stage=stage, model_meta=one.meta, batch_seed=batch_seed, **one.kw)
        return _finish_one(ctx, one, label, params, workdir)


@dataclass
class _Prepared:
    """A model about to train, with what :func:`fit` needs for it."""

    model: Student
    tasks: dict[str, Task]
    loss_fn: Any
    meta: dict[str, Any]
    train_name: str
    splits: Mapping[str, SplitData]
    readers: list[Student]
    kw: dict[str, Any]


def _prepare_one(ctx: StageContext, stage: str, label: str, task_names: Sequence[str], params: Any,
                 init: str | None, teachers: list[Teacher] | None = None) -> _Prepared:
    """Build (seeded by the stage and label) the model of :func:`_train_one` and its inputs."""
    tasks = {t: ctx.tasks[t] for t in task_names}
    seed = ctx.config.seed
    torch.manual_seed(hash_seed(seed, stage, label, "init"))
    model = build_student(ctx.config.student, tasks, ctx.registries)
    attach_input_transform(model, ctx.input_transform)
    if init is not None:
        record = ctx.result(init).models[0]
        init_from(model, ctx.run_dir / record.path, where=f"stages.{stage}.init")
    model.to(ctx.device)
    loss_fn = ctx.registries.loss.get(params.loss.kind)(params.loss)
    training = params.training
    meta = model_meta(ctx.config.student, tasks, stage, inputs=ctx.splits["train"].inputs,
                      data=ctx.config.resolved()["data"])
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
    return _Prepared(model, tasks, loss_fn, meta, train_name, splits, readers, kw)


def _finish_one(ctx: StageContext, one: _Prepared, label: str, params: Any,
                workdir: Path) -> tuple[ModelRecord, dict[str, Any]]:
    """Save a trained model (whole: the frozen weights travel with it) and evaluate it."""
    path = workdir / "model.safetensors"
    distributed.main_only(lambda: save_model(path, one.model, one.meta))
    metrics = _evaluate_splits(ctx, one.model, one.tasks, one.loss_fn, params.training.eval_batch_size, one.splits)
    record = ModelRecord(path=str(path.relative_to(ctx.run_dir)), tasks=list(one.tasks),
                         scores=_primary_scores(one.tasks, metrics["val"]), checksum=file_checksum(path), label=label)
    return record, metrics


def _distill_inputs(ctx: StageContext, stage: str, params: Any, tasks: Mapping[str, Task], teachers: list[Teacher],
                    student: Student, splits: Mapping[str, SplitData], readers: list[Student]) -> dict[str, Any]:
    """fit()'s teacher arguments. When the student reads cached frozen features (``splits``
    are its views), a teacher with the same frozen part reads them too (it joins ``readers``);
    any other teacher reads the raw inputs of the same rows."""
    # a task without a temperature (regression) distills at tau = 1: no tempering, no tau^2
    tau = {t: (v if tasks[t].uses_temperature else 1.0) for t, v in params.temperature_for(list(tasks)).items()}
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
        cache_root = RunLayout(ctx.run_dir).teacher_outputs
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


def _init_problems(stage: Stage, plan: PlanView) -> list[str]:
    init = getattr(stage.params, "init", None)
    if init and init in plan.stages and not plan.stages[init].model_task_sets(plan.tasks):
        return [f"stages.{stage.name}.init: stage '{init}' produces no model to initialise from."]
    return []


def _default_loss() -> dict[str, Any]:
    return {"kind": "kd"}


# -- stage kinds ---------------------------------------------------------------------------

class TrainParams(Params):
    kind: str = "train"
    #: tasks the model learns (default: every task of the run)
    tasks: Optional[list[str]] = None
    #: start from the weights of this earlier stage's model
    init: Optional[str] = None
    loss: Annotated[Any, Component("loss")] = Field(default_factory=_default_loss,
                                                    description="the training objective (kind: kd)")
    training: Annotated[Any, StageTraining()] = Field(
        None, description="this stage's training settings, key by key over the run's training")


class TrainStage(Stage):
    """Supervised multi-task training on the labeled training split (the paper's M1)."""

    Params = TrainParams

    def dependencies(self) -> list[str]:
        return [self.params.init] if self.params.init else []

    def check(self, plan: PlanView) -> list[str]:
        return super().check(plan) + _init_problems(self, plan)

    def describe(self, all_tasks: Sequence[str]) -> str:
        init = f" from {self.params.init}" if self.params.init else ""
        return f"train on labeled data: tasks {', '.join(self.task_names(all_tasks))}{init}"

    def run(self, ctx: StageContext, workdir: Path) -> StageResult:
        record, metrics = _train_one(ctx, self.name, self.name, self.task_names(list(ctx.tasks)), self.params,
                                     workdir, self.params.init)
        return StageResult([record], {split: {record.label: m} for split, m in metrics.items()})


class EnsembleParams(Params):
    kind: str = "ensemble"
    tasks: Optional[list[str]] = Field(None,
                                       description="the tasks whose subsets get a teacher (default: every task of the "
                                                   "run)")
    #: ``all``: every non-empty subset of the tasks (2^n - 1 models); ``proper``: all but the
    #: full set (when the full-task model is trained by another stage); or an explicit list
    subsets: Union[Literal["all", "proper"], list[list[str]]] = "all"
    loss: Annotated[Any, Component("loss")] = Field(default_factory=_default_loss,
                                                    description="the training objective (kind: kd)")
    training: Annotated[Any, StageTraining()] = Field(
        None, description="this stage's training settings, key by key over the run's training")
    #: train all the teachers in one pass over the data per epoch (every teacher steps on each
    #: batch) instead of one after the other; the teachers are the same (see docs/design.md)
    together: bool = False


class EnsembleStage(Stage):
    """Trains one teacher per subset of the tasks (the paper's seven-teacher ensemble)."""

    Params = EnsembleParams

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

    def check(self, plan: PlanView) -> list[str]:
        problems = super().check(plan)
        if problems:  # subsets of unknown tasks would repeat the same mistake
            return problems
        for subset in self.subsets(plan.tasks):
            for task in subset:
                if task not in plan.tasks:
                    problems.append(f"stages.{self.name}.subsets: unknown task '{task}'.")
        return problems

    def describe(self, all_tasks: Sequence[str]) -> str:
        subsets = " ".join("{" + ",".join(s) + "}" for s in self.subsets(all_tasks))
        return f"train {len(self.subsets(all_tasks))} teachers on labeled data: {subsets}"

    def run(self, ctx: StageContext, workdir: Path) -> StageResult:
        # Every teacher draws the same batches (and augmentations), trained one after the
        # other or together, so both ways give the same teachers.
        batch_seed = hash_seed(ctx.config.seed, self.name, "batches")
        subsets = self.subsets(list(ctx.tasks))
        if self.params.together:
            pending = [s for s in subsets if not (workdir / "+".join(s) / "done.json").exists()]
            if pending:
                _train_together(ctx, self.name, pending, self.params, workdir, batch_seed)
        result = StageResult()
        for subset in subsets:
            label = self.label(subset)
            sub = workdir / "+".join(subset)
            done = sub / "done.json"
            if done.exists():  # a finished teacher survives an interrupted ensemble
                saved = read_json(done)
                record, metrics = ModelRecord(**saved["record"]), saved["metrics"]
            else:
                record, metrics = _train_one(ctx, self.name, label, subset, self.params, sub, None,
                                             batch_seed=batch_seed)
                distributed.main_only(lambda: write_json(done, {"record": vars(record), "metrics": metrics}))
            result.models.append(record)
            for split, m in metrics.items():
                result.metrics.setdefault(split, {})[label] = m
        return result

    def label(self, subset: Sequence[str]) -> str:
        return f"{self.name}[{'+'.join(subset)}]"


def _train_together(ctx: StageContext, stage: str, subsets: Sequence[Sequence[str]], params: EnsembleParams,
                    workdir: Path, batch_seed: int) -> None:
    """Train the teachers of these subsets with :func:`fit_together` and write each one's
    ``done.json``, as the one-after-the-other loop of :meth:`EnsembleStage.run` does."""
    labels = [f"{stage}[{'+'.join(s)}]" for s in subsets]
    prepared = [_prepare_one(ctx, stage, label, subset, params, None) for label, subset in zip(labels, subsets)]
    members = [Member(one.model, one.tasks, one.loss_fn, one.splits["val"], hash_seed(ctx.config.seed, stage, label),
                      workdir / "+".join(subset), one.meta, ctx.callbacks(label))
               for one, label, subset in zip(prepared, labels, subsets)]
    readers = [r for one in prepared for r in one.readers]
    # the teachers share the student's encoder config, hence the same frozen-feature view
    train = prepared[0].splits["train"]
    with reading_features(readers):
        fit_together(members, train, params.training, device=ctx.device, batch_seed=batch_seed, stage=stage,
                     augment=prepared[0].kw.get("augment"),
                     callbacks=ctx.callbacks(f"{stage} ({len(members)} teachers together)"))
        for one, label, subset in zip(prepared, labels, subsets):
            sub = workdir / "+".join(subset)
            record, metrics = _finish_one(ctx, one, label, params, sub)
            # every rank waits for the file: the ensemble's loop then reads it on every rank
            distributed.main_only(lambda: write_json(sub / "done.json", {"record": vars(record), "metrics": metrics}))


class DistillParams(Params):
    kind: str = "distill"
    tasks: Optional[list[str]] = Field(None, description="tasks the student learns (default: every task of the run)")
    init: Optional[str] = Field(None, description="start from the weights of this earlier stage's model")
    #: stages whose models teach (a train stage gives one teacher, an ensemble several)
    teachers: list[str] = Field(default_factory=list)
    #: teachers from outside the run, e.g. ``{kind: checkpoint, path: teacher.safetensors}``
    extra_teachers: Annotated[list[Any], Component("teacher")] = Field(default_factory=list)
    #: ``labeled``: CE to the labels plus KL to the teachers on the training split (M2);
    #: ``unlabeled``: KL only, on the unlabeled pool (M3)
    data: Literal["labeled", "unlabeled"] = "labeled"
    #: weight of the soft term (the paper: 0.95)
    alpha: float = Field(0.95, ge=0, le=1)
    #: tau, one value or one per task (the paper's grid: 0.5, 1, 5, 10); ``auto`` (for all tasks
    #: or per task) chooses it from ``temperature_grid`` on the validation split, greedily one
    #: task at a time in the stage's task order
    temperature: Union[float, Literal["auto"], dict[str, Union[float, Literal["auto"]]]] = 1.0
    temperature_grid: list[float] = Field(default_factory=lambda: [0.5, 1.0, 5.0, 10.0], min_length=1,
                                          description="the temperatures that temperature: auto chooses from")
    aggregation: Annotated[Any, Component("aggregation")] = Field(
        default_factory=lambda: {"kind": "mean"},
        description="how the teachers that learned a task are weighted for that task")
    teacher_outputs: TeacherOutputParams = Field(TeacherOutputParams(),
                                                 description="where the teachers' outputs come from: a cache computed "
                                                             "once, or online")
    loss: Annotated[Any, Component("loss")] = Field(default_factory=_default_loss,
                                                    description="the distillation objective (kind: kd)")
    training: Annotated[Any, StageTraining()] = Field(
        None, description="this stage's training settings, key by key over the run's training")

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


def temperature_problems(stage: str, params: Any, own_tasks: Sequence[str],
                         task_kinds: Mapping[str, tuple[str, type]]) -> list[str]:
    """Plan errors for a temperature given to a task that has none (``Task.uses_temperature``).

    ``task_kinds``: task name -> (kind, task class). A per-task temperature must name a task
    with a temperature; a single temperature applies to the stage's tasks that have one, and
    is an error only where none has (1.0, the default, changes nothing and is accepted).
    """
    temperature = getattr(params, "temperature", None)
    untempered = {t: task_kinds[t][0] for t in own_tasks if t in task_kinds and not task_kinds[t][1].uses_temperature}
    if not untempered:
        return []
    explain = "its soft target is the teachers' plain prediction, not a tempered distribution"
    if isinstance(temperature, Mapping):
        return [f"stages.{stage}.temperature.{t}: task '{t}' ({untempered[t]}) has no temperature ({explain}); "
                f"remove this key." for t in temperature if t in untempered]
    if temperature not in (None, 1.0) and len(untempered) == len(own_tasks):
        listed = ", ".join(f"{t} ({k})" for t, k in untempered.items())
        return [f"stages.{stage}.temperature: {temperature!r} is given, but none of the stage's tasks has a "
                f"temperature ({listed}: {explain}); remove the key."]
    return []


class DistillStage(Stage):
    """Knowledge distillation from one or more earlier stages' models (the paper's M2 and M3)."""

    Params = DistillParams

    def dependencies(self) -> list[str]:
        deps = ([self.params.init] if self.params.init else []) + list(self.params.teachers)
        return list(dict.fromkeys(deps))

    def check(self, plan: PlanView) -> list[str]:
        problems = super().check(plan) + _init_problems(self, plan)
        p, own = self.params, self.task_names(plan.tasks)
        if p.teacher_outputs.mode == "cache" and getattr(p.training, "augment", None) is not None:
            problems.append(f"stages.{self.name}.training.augment: random augmentation shows the teachers a new "
                            f"view of every batch, which the teacher-output cache cannot hold; set "
                            f"stages.{self.name}.teacher_outputs.mode: online (or remove the augmentation).")
        if isinstance(p.temperature, Mapping):
            for task in p.temperature:
                if task not in own:
                    problems.append(f"stages.{self.name}.temperature.{task}: '{task}' is not a task of this stage."
                                    f"{did_you_mean(str(task), own)} Tasks: {', '.join(own)}.")
        task_kinds = {t: (plan.config.tasks[t].kind, plan.task_class(t)) for t in own if t in plan.tasks}
        problems += temperature_problems(self.name, p, own, task_kinds)
        # for describe(): which tasks are tempered, and how their soft targets are stored
        self._task_classes = {t: cls for t, (_, cls) in task_kinds.items()}
        # Routing: each task of the stage needs a teacher that learned it. External teachers'
        # tasks are known only once they are loaded (checked then).
        if p.extra_teachers:
            return problems
        if not p.teachers:
            return problems + [f"stages.{self.name}.teachers: stage '{self.name}' needs at least one teacher."]
        learned = set().union(*[s for t in p.teachers if t in plan.stages
                                for s in plan.stages[t].model_task_sets(plan.tasks)])
        missing = [t for t in own if t not in learned]
        if missing and all(t in plan.stages for t in p.teachers):
            problems.append(f"stages.{self.name}.teachers: no teacher of stage '{self.name}' learned task(s) "
                            f"{', '.join(missing)} (teachers: {', '.join(p.teachers)}).")
        return problems

    def describe(self, all_tasks: Sequence[str]) -> str:
        p = self.params
        init = f" from {p.init}" if p.init else ""
        classes = getattr(self, "_task_classes", {})  # known once check() has seen the plan
        tempered = [t for t in self.task_names(all_tasks) if t not in classes or classes[t].uses_temperature]
        tau = p.temperature_for(tempered)
        grid = "/".join(f"{g:g}" for g in p.temperature_grid)
        taus = ", ".join(f"{k}={v:g}" if v != "auto" else f"{k}=auto({grid}, on val)" for k, v in tau.items())
        storage = p.teacher_outputs.storage
        if p.teacher_outputs.mode == "cache" and storage != "fp32":
            kinds = [k for t in self.task_names(all_tasks) if t in classes
                     for k in classes[t].soft_target_kinds.values()]
            if "value" in kinds:  # plain values are never halved unless the task says value_fp16
                storage += " (plain values fp32)"
        return (f"distill on {p.data} data{init}: tasks {', '.join(self.task_names(all_tasks))}; teachers "
                f"{', '.join(p.teachers)} ({p.aggregation.kind}); alpha={p.alpha if p.data == 'labeled' else 1.0:g}; "
                f"{f'tau {taus}' if taus else 'no temperature'}; teacher outputs {p.teacher_outputs.mode}/{storage}")

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
        result.metrics["teacher_weights"] = self.teacher_weights(ctx, teachers, task_names)
        return result

    def teacher_weights(self, ctx: StageContext, teachers: Sequence[Teacher],
                        task_names: Sequence[str]) -> dict[str, Any]:
        """Per task, the weight the aggregation gave each routed teacher, and the validation
        score (with its direction) it read: written to stage.json and metrics.json."""
        policy = ctx.registries.aggregation.get(self.params.aggregation.kind)(self.params.aggregation)
        routes = route_teachers(list(task_names), teachers, policy, where=f"stages.{self.name}.teachers")
        out: dict[str, Any] = {"policy": self.params.aggregation.kind, "tasks": {}}
        for task, route in routes.items():
            out["tasks"][task] = [{"teacher": teachers[i].name, "weight": w, "score": _score(teachers[i].scores.get(task)),
                          "direction": teachers[i].score_directions.get(task, "max")}
                         for i, w in zip(route.teachers, route.weights)]
        return out

    def _choose_temperatures(self, ctx: StageContext, workdir: Path, task_names: Sequence[str],
                             teachers: list[Teacher]) -> tuple[DistillParams, dict[str, Any]]:
        """``temperature: auto``: for each auto task in turn, distill once per candidate tau (the
        tasks chosen so far fixed, the later auto tasks at 1) and keep the tau with the best
        validation score of that task's primary metric (in the metric's direction: the lowest
        error, the highest accuracy). The test split is never read."""
        auto = [t for t in self.params.auto_tasks(task_names) if ctx.tasks[t].uses_temperature]
        if not auto:
            return self.params, {}
        chosen = {t: (1.0 if v == "auto" else float(v)) for t, v in self.params.temperature_for(task_names).items()}
        scores: dict[str, dict[str, float]] = {}
        for task in auto:
            scores[task] = {}
            for tau in self.params.temperature_grid:
                trial = self.params.model_copy(update={"temperature": {**chosen, task: float(tau)}})
                folder = workdir / "temperature_search" / f"{task}-{tau:g}"
                if distributed.is_main():
                    folder.mkdir(parents=True, exist_ok=True)
                record, _ = _train_one(ctx, self.name, self.name, task_names, trial, folder, self.params.init,
                                       teachers=teachers)
                scores[task][f"{tau:g}"] = record.scores[task]  # the validation split's primary metric
            way = direction(ctx.tasks[task], ctx.tasks[task].primary_metric)  # e.g. "min" for an error
            best = max(self.params.temperature_grid,
                       key=lambda tau: (_finite(oriented(scores[task][f"{tau:g}"], way)), -abs(math.log(tau))))
            chosen[task] = float(best)
        final = self.params.model_copy(update={"temperature": dict(chosen)})
        return final, {"chosen": {t: chosen[t] for t in auto}, "grid": list(self.params.temperature_grid),
                       "split": "val", "scores": scores}


class EvaluateParams(Params):
    kind: str = "evaluate"
    #: stages whose models are compared (rows of the table)
    models: list[str] = Field(min_length=1)
    split: Literal["val", "test"] = Field("test", description="the split the models are compared on")
    #: also report every metric per group of rows: per true class of a classification task (e.g.
    #: per broad disease), per value of a dataset field, or per group id (``group``)
    group_by: Optional[str] = None
    batch_size: int = Field(256, ge=1, description="rows per evaluation batch")


class EvaluateStage(Stage):
    """Evaluates earlier stages' models on one split and writes the comparison table."""

    Params = EvaluateParams

    def dependencies(self) -> list[str]:
        return list(self.params.models)

    def model_task_sets(self, all_tasks):
        return []

    def key_tasks(self, all_tasks: Sequence[str]) -> list[str]:
        group_by = self.params.group_by
        return self.task_names(all_tasks) + ([group_by] if group_by in all_tasks else [])

    def check(self, plan: PlanView) -> list[str]:
        from distillkit.evaluation import grouping_problem

        group_by = self.params.group_by
        # a task must be a classification task; a field can be checked only once the data is loaded
        problem = grouping_problem(group_by, {t: plan.task_class(t) for t in plan.tasks}, None) if group_by else None
        return super().check(plan) + ([f"stages.{self.name}.group_by: {problem}"] if problem else [])

    def check_data(self, ctx: StageContext) -> list[str]:
        from distillkit.evaluation import grouping_problem

        group_by = self.params.group_by
        fields = sorted(ctx.splits[self.params.split].raw_labels)
        problem = grouping_problem(group_by, ctx.tasks, fields) if group_by else None
        return [f"stages.{self.name}.group_by: {problem}"] if problem else []

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
                                                               ctx.tasks,
                                                               self.params.batch_size, ctx.device)
                result.metrics.setdefault(self.params.split, {})[record.label] = metrics
        if distributed.is_main():
            write_json(workdir / "metrics.json", result.metrics)
        return result
