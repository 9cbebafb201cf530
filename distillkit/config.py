"""Run configs: safe YAML, ``--set`` overrides, and validation against registered components.

A config names components by ``kind``; the run's schema (:mod:`distillkit.schema`, a pydantic
model built from the registries: a union discriminated on ``kind`` wherever a component goes)
validates it in one call. Every error is collected (not only the first) and reported with its
YAML path and line, and an unknown ``kind`` or key gets a "did you mean". A config never
imports or executes code: YAML is read with the safe loader, and ``kind`` only selects among
components that installed plugins registered.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ForwardRef, Mapping, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from distillkit.data import SplitParams
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.registry import Registries
from distillkit.schema import (SELECTION_ERRORS, TOP_LEVEL, ConfigSchema, Place, config_schema, deep_merge,
                               training_field_of)
from distillkit.training import TrainingParams

__all__ = ["ConfigErrors", "RunConfig", "TOP_LEVEL", "apply_overrides", "config_schema", "deep_merge", "dump",
           "load_config", "read_yaml", "validate_component", "validate_config", "validate_data_sections"]

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


# -- validation ---------------------------------------------------------------------------

class _Problems:
    """Config mistakes, each with its YAML path and line."""

    def __init__(self, file: str, lines: Mapping[str, int]):
        self.file = file
        self.lines = lines
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        line = self._line(path)
        self.items.append(f"{path}{f' (line {line})' if line else ''}: {message}")

    def _line(self, path: str) -> int | None:
        parts = path.split(".")
        while parts:
            line = self.lines.get(".".join(parts))
            if line:
                return line
            parts.pop()
        return None

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigErrors(self.file, self.items)


#: messages of the run's own scalar keys, whatever pydantic's error
_TOP_LEVEL_MESSAGES = {
    "seed": "must be an integer (got {input!r}).",
    "device": "must be auto, cpu, cuda or cuda:N (got {input!r}).",
    "cache_dir": "must be a path (got {input!r}).",
    "tasks": "must map at least one task name to a task (e.g. 'broad: {{kind: classification}}').",
    "stages": "must map at least one stage name to a stage (e.g. 'm1: {{kind: train}}').",
}
_NOT_A_MAPPING = ("model_type", "dict_type", "model_attributes_type")


def _report(problems: _Problems, exc: ValidationError, schema: ConfigSchema, root: Any, prefix: str = "",
            top_level: bool = False, keep: Callable[[list[str]], bool] | None = None) -> None:
    """Add pydantic's errors as today's messages: YAML path without union tags, did-you-mean."""
    for err in exc.errors():
        parts, holder = _walk(schema, root, err["loc"])
        path = ".".join([prefix, *parts] if prefix else parts) or prefix
        kind, message = err["type"], err["msg"]
        if kind in SELECTION_ERRORS:
            path += SELECTION_ERRORS[kind]
        elif top_level and len(parts) == 1:
            key = parts[0]
            if kind == "extra_forbidden":
                message = (f"unknown top-level key '{key}'.{did_you_mean(key, TOP_LEVEL)} "
                           f"Valid keys: {', '.join(TOP_LEVEL)}.")
            elif kind == "missing":
                message = f"missing required section '{key}' ({TOP_LEVEL[key]})."
            elif key in _TOP_LEVEL_MESSAGES:
                message = _TOP_LEVEL_MESSAGES[key].format(input=err.get("input"))
            else:
                message = _plain_message(err, holder, schema, section=True)
        elif top_level and kind in _NOT_A_MAPPING and _is_stage_training(schema, err["loc"]):
            message = "must be a mapping of training settings."
        else:
            message = _plain_message(err, holder, schema, section=False)
        if keep is None or keep(parts):
            problems.add(path, message)


def _plain_message(err: Mapping[str, Any], holder: Any, schema: ConfigSchema, section: bool) -> str:
    kind, message = err["type"], err["msg"]
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        model = schema.originals.get(holder, holder)
        known = list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
        return f"unknown key '{name}'.{did_you_mean(name, known)} Valid keys: {', '.join(known)}."
    if kind in _NOT_A_MAPPING and section:  # `split: 3`, `training: [..]`
        value = err.get("input")
        return f"expected a mapping, got {type(value).__name__} {value!r}."
    if "input" in err and kind != "missing" and "(got " not in message:  # a plugin's message may say it
        message = f"{message} (got {err['input']!r})"
    return message if message.endswith(".") or message.endswith(")") else message + "."


def _is_stage_training(schema: ConfigSchema, loc: tuple) -> bool:
    # ('stages', name, tag, field): a stage's own training settings are not a mapping
    return len(loc) == 4 and loc[0] == "stages" and schema.stage_training.get(str(loc[2])) == loc[3]


def _walk(schema: ConfigSchema, root: Any, loc: tuple) -> tuple[list[str], Any]:
    """A pydantic error location as YAML path parts (the tag a union adds after a component
    place dropped), and the model that holds the last part (for its valid keys)."""
    namespace = schema.namespace
    node, meta, parts, holder = root, [], [], None
    for part in loc:
        node, meta = _unwrap(node, meta, namespace)
        place = next((m for m in meta if isinstance(m, Place)), None)
        meta = []
        if place is not None and part in place.members:  # the union's tag: a registered name
            node = place.members[part]
            continue
        if place is not None and len(place.members) == 1:  # a union of one member may add no tag
            node, _ = _unwrap(next(iter(place.members.values())), [], namespace)
        holder = None
        if isinstance(node, type) and issubclass(node, BaseModel):
            holder = node
            info = node.model_fields.get(part) if isinstance(part, str) else None
            node, meta = (info.annotation, list(info.metadata)) if info is not None else (None, [])
        elif get_origin(node) is dict:
            node = get_args(node)[1] if get_args(node) else None
        elif get_origin(node) in (list, tuple, set, frozenset):
            node = get_args(node)[0] if get_args(node) else None
        elif get_origin(node) in (Union, types.UnionType):
            node = next((a for a in get_args(node) if isinstance(a, type) and a.__name__ == part), None)
        else:
            node = None
        parts.append(str(part))
    return parts, holder


def _unwrap(node: Any, meta: list[Any], namespace: Mapping[str, Any]) -> tuple[Any, list[Any]]:
    """Strip ``Annotated`` (keeping its metadata), forward references and ``Optional``."""
    meta = list(meta)
    for _ in range(20):
        if isinstance(node, str):
            node = namespace.get(node)
        elif isinstance(node, ForwardRef):
            node = namespace.get(node.__forward_arg__)
        elif get_origin(node) is Annotated:
            meta += list(node.__metadata__)
            node = get_args(node)[0]
        elif get_origin(node) in (Union, types.UnionType) and type(None) in get_args(node):
            rest = [a for a in get_args(node) if a is not type(None)]
            if len(rest) != 1:
                node = Union[tuple(rest)]
                break
            node = rest[0]
        else:
            break
    return node, meta


def validate_component(kind: str, raw: Any, registries: Registries, file: str = "<config>",
                       path: str = "") -> BaseModel:
    """Validate one component mapping (``kind: ...`` plus its params, nested components too)."""
    schema = config_schema(registries)
    try:
        return schema.adapter(kind).validate_python(raw)
    except ValidationError as exc:
        problems = _Problems(file, {})
        _report(problems, exc, schema, schema.places[kind], prefix=path or kind)
        raise ConfigErrors(file, problems.items) from None


def validate_data_sections(data: Mapping[str, Any], registries: Registries, file: str = "<config>",
                           lines: Mapping[str, int] | None = None) -> tuple[BaseModel, SplitParams, str | None]:
    """Validate only the ``data``, ``split`` and ``cache_dir`` sections of a config mapping.

    For tools that re-create a run's data (``eval``, ``report``): the other sections are
    not theirs to check. Errors are reported together, with paths and lines, as for a run.
    """
    schema = config_schema(registries)
    problems = _Problems(file, lines or {})
    try:
        sections = schema.data_sections.model_validate(
            {k: v for k, v in data.items() if k in ("data", "split", "cache_dir")})
    except ValidationError as exc:
        _report(problems, exc, schema, schema.data_sections, top_level=True)
        problems.raise_if_any()
    return sections.data, sections.split, sections.cache_dir


def _own_training(schema: ConfigSchema, data: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """``{stage: (its StageTraining field, its own settings)}`` for the stages that train
    with the run's settings."""
    own: dict[str, tuple[str, Any]] = {}
    stages = data.get("stages")
    if not isinstance(stages, Mapping):
        return own
    for name, spec in stages.items():
        field_name = training_field_of(spec, schema.stage_training)
        if field_name is not None:
            own[str(name)] = (field_name, (spec.get(field_name) if isinstance(spec, Mapping) else None) or {})
    return own


def _check_samplers(problems: _Problems, data: Mapping[str, Any], own_training: Mapping[str, tuple[str, Any]],
                    registries: Registries) -> None:
    """A balanced sampler must name a classification task of the run (read from the raw
    mapping, so that the mistake is reported with the others)."""
    from distillkit.builtin.classification import ClassificationParams

    tasks = data.get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        return
    tasks = {str(k): v for k, v in tasks.items()}
    run_training = data.get("training")
    run_sampler = run_training.get("sampler") if isinstance(run_training, Mapping) else None
    places: list[tuple[str, Any]] = [("training.sampler", run_sampler)]
    for name, (_, own) in own_training.items():
        if isinstance(own, Mapping) and "sampler" in own:  # inherited ones are checked once, above
            sampler = own["sampler"]
            if isinstance(run_sampler, Mapping) and isinstance(sampler, Mapping):
                sampler = deep_merge(run_sampler, sampler)
            places.append((f"stages.{name}.training.sampler", sampler))
    for path, sampler in places:
        if not isinstance(sampler, Mapping) or sampler.get("kind") != "balanced" or not isinstance(
                sampler.get("task"), str):
            continue
        task = sampler["task"]
        if task not in tasks:
            problems.add(f"{path}.task", f"unknown task '{task}'.{did_you_mean(task, tasks)} "
                                         f"Tasks of this run: {', '.join(tasks)}.")
            continue
        spec = tasks[task]
        kind = spec if isinstance(spec, str) else spec.get("kind") if isinstance(spec, Mapping) else None
        params = getattr(registries.task.get(kind), "Params", None) if isinstance(kind, str) and kind in \
            registries.task else None
        if isinstance(params, type) and not issubclass(params, ClassificationParams):
            problems.add(f"{path}.task", f"task '{task}' is a {kind} task; a balanced sampler balances the classes "
                                         f"of a classification task.")


def validate_config(data: Mapping[str, Any], registries: Registries, file: str = "<config>",
                    lines: Mapping[str, int] | None = None, base_dir: Path | None = None) -> RunConfig:
    """Validate a run config mapping against the schema built from ``registries``.

    Every mistake is reported at once (:class:`ConfigErrors`), with its YAML path and line.
    """
    schema = config_schema(registries)
    problems = _Problems(file, lines or {})
    own_training = _own_training(schema, data)

    def keep(parts: list[str]) -> bool:
        # A stage's training settings are the run's with its own keys over them: a mistake in
        # a key the stage does not set is the run's, reported once under training.<key>.
        if len(parts) < 3 or parts[0] != "stages" or parts[1] not in own_training:
            return True
        field_name, own = own_training[parts[1]]
        if parts[2] != field_name or not isinstance(own, Mapping):
            return True
        return len(parts) > 3 and parts[3] in own

    run = None
    try:
        run = schema.run.model_validate(data)
    except ValidationError as exc:
        _report(problems, exc, schema, schema.run, top_level=True, keep=keep)
    _check_samplers(problems, data, own_training, registries)
    problems.raise_if_any()
    assert run is not None
    return RunConfig(file=file, base_dir=base_dir or Path("."), name=Path(file).stem if run.name is None else run.name,
                     seed=run.seed, device=run.device, cache_dir=run.cache_dir, data=run.data, split=run.split,
                     tasks=dict(run.tasks), student=run.student, training=run.training, stages=dict(run.stages),
                     raw=dict(data))


def load_config(path: str | Path, registries: Registries, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config file."""
    data, lines = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_config(data, registries, file=str(path), lines=lines, base_dir=Path(path).resolve().parent)
