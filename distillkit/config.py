"""Run configs: safe YAML, ``--set`` overrides, and validation against registered components.

A config names components by ``kind``; each component's own strict pydantic ``Params`` model
validates the rest of its mapping. Every error is collected (not only the first) and reported
with its YAML path and line, and an unknown ``kind`` gets a "did you mean". A config never
imports or executes code: YAML is read with the safe loader, and ``kind`` only selects among
components that installed plugins registered.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_args

import yaml
from pydantic import BaseModel, ValidationError

from distillkit.data import SplitParams
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.registry import Registries
from distillkit.training import TrainingParams

TOP_LEVEL = {
    "name": "a label for the run",
    "seed": "global random seed",
    "device": "auto | cpu | cuda | cuda:N",
    "cache_dir": "where decoded images and teacher outputs are cached",
    "data": "the dataset source (kind: ...)",
    "split": "patient-level split fractions",
    "tasks": "mapping of task name -> task (kind: ...)",
    "student": "the student architecture (kind: ...)",
    "training": "default training settings for every stage",
    "stages": "mapping of stage name -> stage (kind: ...)",
}


class ConfigErrors(DistillkitError):
    """Several config mistakes, reported together."""

    def __init__(self, file: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in the config:\n{lines}", where=file)


@dataclass
class RunConfig:
    """A validated run config: each component section is its Params instance."""

    file: str
    base_dir: Path
    name: str
    seed: int
    device: str
    cache_dir: str | None
    data: BaseModel
    split: SplitParams
    tasks: dict[str, BaseModel]
    student: BaseModel
    training: TrainingParams
    stages: dict[str, BaseModel]
    raw: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        """The config with every default filled in, as plain data (written to the run dir)."""
        return {
            "name": self.name, "seed": self.seed, "device": self.device, "cache_dir": self.cache_dir,
            "data": dump(self.data), "split": dump(self.split),
            "tasks": {k: dump(v) for k, v in self.tasks.items()},
            "student": dump(self.student), "training": dump(self.training),
            "stages": {k: dump(v) for k, v in self.stages.items()},
        }


def dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {k: dump(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [dump(v) for v in value]
    if isinstance(value, Path):  # e.g. a manifest path: config.yaml must stay plain, safe YAML
        return str(value)
    return value


# -- reading ------------------------------------------------------------------------------

def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML file with the safe loader; also return the line of every key path."""
    path = Path(path)
    if not path.is_file():
        raise DistillkitError(f"config file {path} does not exist." if not path.exists()
                              else f"{path} is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DistillkitError(f"the file is not UTF-8 text (byte {exc.start}).", where=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise DistillkitError(f"invalid YAML: {problem}.", where=where) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DistillkitError("the top level of a config must be a mapping of keys to values.", where=str(path))
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    return data, lines


def _collect_lines(node: Any, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            lines[path] = key.start_mark.line + 1
            _collect_lines(value, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            path = f"{prefix}.{i}"
            lines[path] = value.start_mark.line + 1
            _collect_lines(value, path, lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; the value is parsed as a YAML scalar/flow value."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise DistillkitError(f"override '{item}' must look like key.path=value.", where="--set")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise DistillkitError(f"the value of override '{item}' is not valid YAML.", where="--set") from None
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise DistillkitError(f"cannot set '{key}': '{part}' is not a mapping.", where="--set")
            node = nxt
        node[parts[-1]] = value
    return data


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


# -- validation ---------------------------------------------------------------------------

class _Validator:
    def __init__(self, registries: Registries, file: str, lines: Mapping[str, int]):
        self.registries = registries
        self.file = file
        self.lines = lines
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        line = self._line(path)
        self.problems.append(f"{path}{f' (line {line})' if line else ''}: {message}")

    def _line(self, path: str) -> int | None:
        parts = path.split(".")
        while parts:
            line = self.lines.get(".".join(parts))
            if line:
                return line
            parts.pop()
        return None

    def model(self, cls: type[BaseModel], raw: Any, path: str) -> BaseModel | None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.problem(path, f"expected a mapping, got {type(raw).__name__} {raw!r}.")
            return None
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                sub = f"{path}.{loc}" if loc else path
                msg = err["msg"]
                if err["type"] == "extra_forbidden":
                    name = str(err["loc"][-1])
                    known = _keys_at(cls, err["loc"][:-1])
                    msg = f"unknown key '{name}'.{did_you_mean(name, known)} Valid keys: {', '.join(known)}."
                elif "input" in err and err["type"] not in ("missing",):
                    msg = f"{msg} (got {err['input']!r})"
                self.problem(sub, msg if msg.endswith(".") or msg.endswith(")") else msg + ".")
            return None

    def component(self, kind: str, raw: Any, path: str) -> BaseModel | None:
        """Select a registered component by ``raw['kind']`` and validate it with its Params."""
        registry = self.registries.by_kind[kind]
        if isinstance(raw, str):
            raw = {"kind": raw}
        if not isinstance(raw, Mapping):
            self.problem(path, f"expected a mapping with 'kind: <{kind}>', got {raw!r}.")
            return None
        name = raw.get("kind")
        if name is None:
            self.problem(path, f"missing 'kind'. Known {kind}s: {', '.join(registry.names())}.")
            return None
        if not isinstance(name, str):  # e.g. `kind: []` or `kind: 3`
            self.problem(f"{path}.kind", f"must be the name of a {kind} (got {name!r}). "
                                         f"Known {kind}s: {', '.join(registry.names()) or 'none'}.")
            return None
        if name not in registry:
            self.problem(f"{path}.kind", f"unknown {kind} '{name}'.{did_you_mean(name, registry.names())} "
                                          f"Known {kind}s: {', '.join(registry.names()) or 'none'}.")
            return None
        cls = registry.get(name)
        raw = dict(raw)
        nested = getattr(cls, "nested", {})
        # Nested components (a student's encoder, a stage's aggregation) are validated by
        # their own registries; the outer Params holds them as opaque values until then.
        inner_raw = {k: raw[k] for k in nested if k in raw}
        if getattr(cls, "uses_training", False):
            raw["training"] = None
        params = self.model(cls.Params, raw, path)
        if params is None:
            return None
        updates: dict[str, Any] = {}
        for fname, sub_kind in nested.items():
            sub_raw = inner_raw.get(fname, getattr(params, fname))
            if sub_raw is None:
                continue
            if isinstance(sub_raw, BaseModel):  # a default already validated
                continue
            if isinstance(sub_raw, list):
                updates[fname] = [self.component(sub_kind, item, f"{path}.{fname}.{i}")
                                  for i, item in enumerate(sub_raw)]
            else:
                updates[fname] = self.component(sub_kind, sub_raw, f"{path}.{fname}")
        return params.model_copy(update=updates) if updates else params


def _keys_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The keys of the model that ``loc`` points into (``training.optimizer`` -> the optimizer's)."""
    for part in loc:
        info = cls.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            continue  # a list index: stay with the model of the list's items
        inner = [t for t in (info.annotation, *get_args(info.annotation))
                 if isinstance(t, type) and issubclass(t, BaseModel)]
        if not inner:
            break
        cls = inner[0]
    return list(cls.model_fields)


def validate_component(kind: str, raw: Any, registries: Registries, file: str = "<config>",
                       path: str = "") -> BaseModel:
    """Validate one component mapping (``kind: ...`` plus its params, nested components too)."""
    v = _Validator(registries, file, {})
    params = v.component(kind, raw, path or kind)
    if v.problems or params is None:
        raise ConfigErrors(file, v.problems)
    return params


def validate_data_sections(data: Mapping[str, Any], registries: Registries, file: str = "<config>",
                           lines: Mapping[str, int] | None = None) -> tuple[BaseModel, SplitParams, str | None]:
    """Validate only the ``data``, ``split`` and ``cache_dir`` sections of a config mapping.

    For tools that re-create a run's data (``eval``, ``report``): the other sections are
    not theirs to check. Errors are reported together, with paths and lines, as for a run.
    """
    v = _Validator(registries, file, lines or {})
    if "data" not in data:
        v.problem("data", f"missing required section 'data' ({TOP_LEVEL['data']}).")
    dataset = v.component("dataset", data["data"], "data") if "data" in data else None
    split = v.model(SplitParams, data.get("split"), "split")
    cache_dir = data.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        v.problem("cache_dir", f"must be a path (got {cache_dir!r}).")
    if v.problems:
        raise ConfigErrors(file, v.problems)
    assert dataset is not None and split is not None
    return dataset, split, cache_dir


def _training(v: _Validator, raw: Any, path: str) -> TrainingParams | None:
    """Training settings, with the optional ``augment`` component validated by its registry."""
    training = v.model(TrainingParams, raw, path)
    if training is None or training.augment is None:
        return training
    augment = v.component("augmentation", training.augment, f"{path}.augment")
    return training.model_copy(update={"augment": augment}) if augment is not None else None


def _check_samplers(v: _Validator, training: TrainingParams | None, stages: Mapping[str, BaseModel],
                    tasks: Mapping[str, BaseModel], raw_stages: Mapping[str, Any]) -> None:
    """A balanced sampler must name a classification task of the run."""
    from distillkit.builtin.classification import ClassificationParams

    places: list[tuple[str, Any]] = [("training.sampler", training.sampler if training is not None else None)]
    for name, params in stages.items():
        own = (raw_stages.get(name) or {}).get("training") if isinstance(raw_stages.get(name), Mapping) else None
        if isinstance(own, Mapping) and "sampler" in own:  # inherited ones are checked once, above
            places.append((f"stages.{name}.training.sampler", getattr(params, "training").sampler))
    for path, sampler in places:
        if sampler is None or sampler.kind != "balanced" or not tasks:
            continue
        if sampler.task not in tasks:
            v.problem(f"{path}.task", f"unknown task '{sampler.task}'.{did_you_mean(str(sampler.task), tasks)} "
                                      f"Tasks of this run: {', '.join(tasks)}.")
        elif not isinstance(tasks[sampler.task], ClassificationParams):
            v.problem(f"{path}.task", f"task '{sampler.task}' is a {getattr(tasks[sampler.task], 'kind', '?')} task; "
                                      f"a balanced sampler balances the classes of a classification task.")


def validate_config(data: Mapping[str, Any], registries: Registries, file: str = "<config>",
                    lines: Mapping[str, int] | None = None, base_dir: Path | None = None) -> RunConfig:
    v = _Validator(registries, file, lines or {})
    for key in data:
        if key not in TOP_LEVEL:
            v.problem(str(key), f"unknown top-level key '{key}'.{did_you_mean(str(key), TOP_LEVEL)} "
                                f"Valid keys: {', '.join(TOP_LEVEL)}.")
    for key in ("data", "tasks", "student", "stages"):
        if key not in data:
            v.problem(key, f"missing required section '{key}' ({TOP_LEVEL[key]}).")

    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        v.problem("seed", f"must be an integer (got {seed!r}).")
        seed = 0
    device = data.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:")):
        v.problem("device", f"must be auto, cpu, cuda or cuda:N (got {device!r}).")
        device = "cpu"
    cache_dir = data.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        v.problem("cache_dir", f"must be a path (got {cache_dir!r}).")
        cache_dir = None

    dataset = v.component("dataset", data["data"], "data") if "data" in data else None
    split = v.model(SplitParams, data.get("split"), "split")

    tasks: dict[str, BaseModel] = {}
    raw_tasks = data.get("tasks") or {}
    if not isinstance(raw_tasks, Mapping) or ("tasks" in data and not raw_tasks):
        v.problem("tasks", "must map at least one task name to a task (e.g. 'broad: {kind: classification}').")
        raw_tasks = {}
    for name, spec in raw_tasks.items():
        params = v.component("task", spec, f"tasks.{name}")
        if params is not None:
            tasks[str(name)] = params

    student = v.component("student", data["student"], "student") if "student" in data else None
    raw_training = data.get("training") or {}
    training = _training(v, raw_training, "training")

    stages: dict[str, BaseModel] = {}
    raw_stages = data.get("stages") or {}
    if not isinstance(raw_stages, Mapping) or ("stages" in data and not raw_stages):
        v.problem("stages", "must map at least one stage name to a stage (e.g. 'm1: {kind: train}').")
        raw_stages = {}
    for name, spec in raw_stages.items():
        path = f"stages.{name}"
        params = v.component("stage", spec, path)
        if params is None:
            continue
        cls = registries.stage.get(params.kind)
        if getattr(cls, "uses_training", False):
            own = (spec or {}).get("training") or {}
            if not isinstance(own, Mapping):
                v.problem(f"{path}.training", "must be a mapping of training settings.")
                continue
            if not isinstance(raw_training, Mapping):
                continue
            # A stage's training settings override the run's defaults key by key; only keys
            # the stage itself sets are reported here (the defaults are checked above).
            before = len(v.problems)
            stage_training = _training(v, deep_merge(raw_training, own), f"{path}.training")
            v.problems[before:] = [p for p in v.problems[before:]
                                   if any(p.startswith(f"{path}.training.{k}") for k in own)]
            if stage_training is None:
                continue
            params = params.model_copy(update={"training": stage_training})
        stages[str(name)] = params

    _check_samplers(v, training, stages, tasks, raw_stages if isinstance(raw_stages, Mapping) else {})
    if v.problems:
        raise ConfigErrors(file, v.problems)
    assert dataset is not None and split is not None and student is not None and training is not None
    config = RunConfig(file=file, base_dir=base_dir or Path("."), name=str(data.get("name", Path(file).stem)),
                       seed=seed, device=device, cache_dir=cache_dir, data=dataset, split=split, tasks=tasks,
                       student=student, training=training, stages=stages, raw=dict(data))
    return config


def load_config(path: str | Path, registries: Registries, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config file."""
    data, lines = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_config(data, registries, file=str(path), lines=lines, base_dir=Path(path).resolve().parent)
