"""The run config's schema, built from the registries.

Every place in a config that holds a component (``data``, ``tasks.<name>``, ``student``,
``student.encoder``, ``stages.<name>``, a stage's ``loss``, ``aggregation`` and
``extra_teachers``, ``training.augment``, and whatever a plugin's ``Params`` declare) is a
pydantic union discriminated on ``kind`` over the ``Params`` of every component registered
for that kind. A component's ``Params`` says which of its fields hold nested components by
their type annotation::

    class MyStudentParams(Params):
        kind: str = "my_student"
        encoder: Annotated[Any, Component("encoder")] = {"kind": "mlp"}
        backup: Annotated[Optional[Any], Component("encoder")] = None     # may be null
        heads: Annotated[list[Any], Component("loss")] = []                # a list of them

and a stage that trains with the run's ``training`` settings (its own mapping's keys over
them) marks its field ``training: Annotated[Any, StageTraining()] = None``.

The ``Params`` classes stay as plugins wrote them (``kind: str``, nested fields ``Any``). For
the schema, each registration gets a generated subclass whose ``kind`` is ``Literal[name]``
(the union's tag) and whose nested fields are the unions of their kinds; a validated value is
turned back into an instance of the registered ``Params``, so the rest of distillkit sees the
classes it always saw. ``distillkit schema`` prints the model's JSON Schema, for editors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import (Annotated, Any, ForwardRef, Literal, Mapping, Optional, Union, get_args, get_origin)

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, TypeAdapter,
                      create_model, model_validator)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from distillkit.errors import DistillkitError, did_you_mean, plural

# -- what plugin authors write -------------------------------------------------------------


class Component:
    """Marks a ``Params`` field that holds a nested component of a registry ``kind``.

    ``encoder: Annotated[Any, Component("encoder")] = {"kind": "mlp"}``: the config gives a
    mapping with ``kind:`` (or just the name, ``encoder: resnet18``), validated with that
    component's own ``Params``; the field then holds those params. ``Annotated[list[Any],
    Component("teacher")]`` holds a list of them, ``Annotated[Optional[Any], ...]`` allows null.
    """

    def __init__(self, kind: str):
        self.kind = kind

    def __repr__(self) -> str:
        return f"Component({self.kind!r})"


class StageTraining:
    """Marks a stage ``Params`` field that holds the stage's training settings: the run's
    ``training`` section with the keys of the stage's own mapping over it, key by key. A
    mistake in a key the stage sets is reported under ``stages.<name>.training.<key>``; one in
    the run's section only once, under ``training.<key>``."""

    def __repr__(self) -> str:
        return "StageTraining()"


def model_components(model: Any) -> dict[str, str]:
    """``{field: registry kind}`` of the fields of a pydantic model marked with :class:`Component`."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return {}
    return {name: marker.kind for name, info in model.model_fields.items()
            for marker in info.metadata if isinstance(marker, Component)}


def component_fields(component: Any) -> dict[str, str]:
    """``{field: registry kind}`` of the nested components of a component class's ``Params``.

    Read from the annotations (:class:`Component`); a plain ``nested = {"encoder": "encoder"}``
    class attribute, the older way to say it, is read too."""
    params = getattr(component, "Params", None)
    found = model_components(params)
    legacy = _legacy_attribute(component, "nested")
    if isinstance(legacy, Mapping) and isinstance(params, type) and issubclass(params, BaseModel):
        for name, kind in legacy.items():
            if name in params.model_fields:
                found.setdefault(str(name), str(kind))
    return found


def stage_training_field(component: Any) -> str | None:
    """The field of a stage's ``Params`` marked :class:`StageTraining` (``training``), if any.

    A class attribute ``uses_training = True``, the older way to say it, marks ``training``."""
    params = getattr(component, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        return None
    for name, info in params.model_fields.items():
        if any(isinstance(m, StageTraining) for m in info.metadata):
            return name
    if _legacy_attribute(component, "uses_training") is True and "training" in params.model_fields:
        return "training"
    return None


def _legacy_attribute(cls: Any, name: str) -> Any:
    for klass in getattr(cls, "__mro__", ()):
        if name in vars(klass):
            value = vars(klass)[name]
            return None if isinstance(value, NestedComponents) else value
    return None


class NestedComponents:
    """``Student.nested`` / ``Stage.nested``: the class's :func:`component_fields`, read-only
    (for code written before the annotations; declare nested components with :class:`Component`)."""

    def __get__(self, obj: Any, owner: type) -> dict[str, str]:
        return model_components(getattr(owner, "Params", None))


# -- the schema ----------------------------------------------------------------------------

#: the top-level keys of a run config and what each holds
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

#: error types raised while a component is selected, and the path suffix each is reported at
SELECTION_ERRORS = {"component_type": "", "component_kind_missing": "", "component_kind_type": ".kind",
                    "component_kind_unknown": ".kind"}


@dataclass(frozen=True)
class Place:
    """Metadata of a component union: its registry kind and ``{registered name: schema model}``."""

    kind: str
    members: dict[str, type[BaseModel]] = field(hash=False, compare=False)

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        union = handler(core_schema)
        names = list(self.members)
        shorthand = {"type": "string", "enum": names,
                     "description": f"the name of a registered {self.kind}, short for {{kind: NAME}}"}
        return {"anyOf": [shorthand, union]} if names else shorthand


@dataclass
class ConfigSchema:
    """The pydantic models of a run config for one set of registries."""

    #: the whole run config
    run: type[BaseModel]
    #: only ``data``, ``split`` and ``cache_dir`` (for tools that re-create a run's data)
    data_sections: type[BaseModel]
    #: ``{registry kind: Annotated union}``: the type of a place that holds one component
    places: dict[str, Any]
    #: ``{stage kind: its StageTraining field}``
    stage_training: dict[str, str]
    #: schema model -> the registered Params it stands for
    originals: dict[type, type]
    _adapters: dict[str, TypeAdapter] = field(default_factory=dict)

    @property
    def namespace(self) -> dict[str, Any]:
        """The names by which generated models refer to the places (forward references)."""
        return {_place_name(kind): place for kind, place in self.places.items()}

    def adapter(self, kind: str) -> TypeAdapter:
        if kind not in self._adapters:
            self._adapters[kind] = TypeAdapter(self.places[kind])
        return self._adapters[kind]

    def json_schema(self) -> dict[str, Any]:
        """The run config's JSON Schema (for editors: the YAML language server, VS Code)."""
        schema = self.run.model_json_schema()
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def config_schema(registries: Any) -> ConfigSchema:
    """The run config's schema for ``registries`` (built once per set of registered components)."""
    key = tuple((kind, tuple((e.name, id(e.component)) for e in registry.entries()))
                for kind, registry in registries.by_kind.items())
    cached = registries.__dict__.get("_config_schema")
    if cached is not None and cached[0] == key:
        return cached[1]
    schema = _Builder(registries).build()
    registries.__dict__["_config_schema"] = (key, schema)
    return schema


def _base_names(model: type) -> dict[str, Any]:
    """Names the annotations of ``model``'s bases may use. Rebuilding a generated model
    evaluates them again: from the bases' modules, and, for a class whose module cannot be
    imported (defined by ``exec``), from ``typing`` and distillkit's markers."""
    import sys
    import typing

    names: dict[str, Any] = {k: getattr(typing, k) for k in typing.__all__}
    names.update(Component=Component, StageTraining=StageTraining)
    for base in reversed(model.__mro__[1:]):
        module = sys.modules.get(base.__module__)
        if module is not None:
            names.update(vars(module))
    return names


def _place_name(kind: str) -> str:
    return f"_place_{kind}"


class _Builder:
    def __init__(self, registries: Any):
        self.registries = registries
        self.models: list[type[BaseModel]] = []  # every generated model, rebuilt once the places exist
        self.originals: dict[type, type] = {}
        self.plain: dict[type, Any] = {}  # plain models (TrainingParams) -> the type that validates them
        self.training: Any = None  # TrainingParams's

    def build(self) -> ConfigSchema:
        from distillkit.data import SplitParams
        from distillkit.training import TrainingParams

        self.training = self.model(TrainingParams)
        places = {kind: self.place(kind) for kind in self.registries.by_kind}
        namespace = {_place_name(kind): place for kind, place in places.items()}
        for model in self.models:
            model.model_rebuild(_types_namespace={**_base_names(model), **namespace})
        stage_training = {e.name: f for e in self.registries.stage.entries()
                          if (f := stage_training_field(e.component)) is not None}

        def prepare(cls: type, data: Any) -> Any:
            return _prepare_run(data, stage_training)

        none_is_empty = BeforeValidator(lambda v: {} if v is None else v)
        section = dict(extra="forbid", title="distillkit run config")
        run = create_model(
            "RunConfig", __config__=ConfigDict(**section),
            __validators__={"_prepare": model_validator(mode="before")(prepare)},
            name=(Annotated[Optional[str], BeforeValidator(str)],
                  Field(None, description=TOP_LEVEL["name"] + " (default: the config file's name)")),
            seed=(int, Field(0, strict=True, description=TOP_LEVEL["seed"])),
            device=(str, Field("auto", strict=True, pattern=r"^(auto|cpu|cuda|mps|cuda:.*)$",
                               description=TOP_LEVEL["device"])),
            cache_dir=(Optional[str], Field(None, strict=True, description=TOP_LEVEL["cache_dir"])),
            data=(places["dataset"], Field(description=TOP_LEVEL["data"])),
            split=(Annotated[SplitParams, none_is_empty], Field(default_factory=SplitParams,
                                                                description=TOP_LEVEL["split"])),
            tasks=(dict[str, places["task"]], Field(min_length=1, description=TOP_LEVEL["tasks"])),
            student=(places["student"], Field(description=TOP_LEVEL["student"])),
            training=(Annotated[self.training, none_is_empty],
                      Field(default_factory=dict, validate_default=True,
                            description=TOP_LEVEL["training"])),
            stages=(dict[str, places["stage"]], Field(min_length=1, description=TOP_LEVEL["stages"])),
        )
        data_sections = create_model(
            "DataSections", __config__=ConfigDict(extra="ignore"),
            data=(places["dataset"], Field(description=TOP_LEVEL["data"])),
            split=(Annotated[SplitParams, none_is_empty], Field(default_factory=SplitParams)),
            cache_dir=(Optional[str], Field(None, strict=True)),
        )
        return ConfigSchema(run, data_sections, places, stage_training, self.originals)

    # A place: one component of a registry kind, chosen by `kind`
    def place(self, kind: str) -> Any:
        registry = self.registries.by_kind[kind]
        members = {e.name: self.member(kind, e.name, e.component) for e in registry.entries()}
        select = BeforeValidator(_selector(kind, list(members)))
        if not members:  # nothing registered: every value is refused by the selector
            return Annotated[Any, select, Place(kind, members)]
        converted = tuple(Annotated[m, AfterValidator(_to_original(self.originals.get(m, m)))]
                          for m in members.values())
        return Annotated[Union[converted], Discriminator("kind"), select, Place(kind, members)]

    def member(self, kind: str, name: str, component: Any) -> type[BaseModel]:
        from distillkit.interfaces import Params

        params = getattr(component, "Params", None)
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            params = None
        base = params or Params
        info = base.model_fields.get("kind")
        fields: dict[str, Any] = {"kind": (Literal[name], Field(description=(info.description if info else None)
                                                                or "the registered name that selects this component"))}
        nested = component_fields(component)
        for fname, sub_kind in nested.items():
            fields[fname] = self.nested_field(base, fname, sub_kind, f"{kind} '{name}'")
        trains = stage_training_field(component) if kind == "stage" else None
        if trains is not None and trains not in nested:
            fields[trains] = (Optional[self.training], _copy_field(base.model_fields[trains], validate_default=False))
        fields.update(self.plain_fields(base, skip=set(fields)))
        label = name if name.isidentifier() else "".join(c if c.isalnum() else "_" for c in name)
        model = create_model(f"{kind}.{label}", __base__=base, __module__=base.__module__, **fields)
        self.models.append(model)
        if params is not None and "kind" in params.model_fields:
            self.originals[model] = params  # (Params without a `kind` stay the generated subclass: it has one)
        return model

    def nested_field(self, model: type[BaseModel], fname: str, kind: str, owner: str) -> tuple[Any, FieldInfo]:
        if kind not in self.registries.by_kind:
            raise DistillkitError(f"{owner}: field '{fname}' nests a component of kind '{kind}', which is not a "
                                  f"registry kind.{did_you_mean(kind, self.registries.by_kind)} "
                                  f"Kinds: {', '.join(self.registries.by_kind)}.")
        info = model.model_fields[fname]
        ref: Any = ForwardRef(_place_name(kind))
        if _is_list(info.annotation):
            ref = list[ref]  # type: ignore[valid-type]
        if _admits_none(info):
            ref = Optional[ref]
        return ref, _copy_field(info, validate_default=True)

    def plain_fields(self, model: type[BaseModel], skip: set[str]) -> dict[str, Any]:
        """Fields typed as a plain pydantic model (or an optional one) that nests components."""
        out = {}
        for fname, info in model.model_fields.items():
            if fname in skip:
                continue
            annotation, optional = info.annotation, False
            if get_origin(annotation) is Union and type(None) in get_args(annotation):
                rest = [a for a in get_args(annotation) if a is not type(None)]
                annotation, optional = (rest[0] if len(rest) == 1 else None), True
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                schema_model = self.model(annotation)
                if schema_model is not annotation:
                    out[fname] = (Optional[schema_model] if optional else schema_model,
                                  _copy_field(info, validate_default=True))
        return out

    def model(self, model: type[BaseModel]) -> Any:
        """``model`` itself or, when it nests components, a subclass whose nested components are
        unions of their kinds (annotated to take and give instances of ``model``)."""
        if model in self.plain:
            return self.plain[model]
        self.plain[model] = model  # while building (a model that nests itself stays as is)
        fields = {f: self.nested_field(model, f, k, model.__name__) for f, k in model_components(model).items()}
        fields.update(self.plain_fields(model, skip=set(fields)))
        if not fields:
            return model
        schema_model = create_model(model.__name__, __base__=model, __module__=model.__module__, **fields)
        self.models.append(schema_model)
        self.originals[schema_model] = model
        self.plain[model] = Annotated[schema_model, BeforeValidator(_as_mapping(model)),  # type: ignore[assignment]
                                      AfterValidator(_to_original(model))]
        return self.plain[model]


def _selector(kind: str, names: list[str]):
    """The step before the union: a name becomes ``{kind: name}``; a missing, mistyped or
    unknown ``kind`` gets the registry's message (the union would only list tags)."""
    known, kinds = ", ".join(names) or "none", plural(kind)

    def select(value: Any) -> Any:
        if isinstance(value, BaseModel):  # already-validated params (a default given as an instance)
            value = {k: getattr(value, k) for k in type(value).model_fields}
        if isinstance(value, str):
            value = {"kind": value}
        if not isinstance(value, Mapping):
            raise _error("component_type", f"expected a mapping with 'kind: <{kind}>', got {value!r}.")
        name = value.get("kind")
        if name is None:
            raise _error("component_kind_missing", f"missing 'kind'. Known {kinds}: {', '.join(names)}.")
        if not isinstance(name, str):  # e.g. `kind: []` or `kind: 3`
            raise _error("component_kind_type", f"must be the name of a {kind} (got {name!r}). Known {kinds}: {known}.")
        if name not in names:
            raise _error("component_kind_unknown",
                         f"unknown {kind} '{name}'.{did_you_mean(name, names)} Known {kinds}: {known}.")
        return dict(value)

    return select


def _error(kind: str, message: str) -> PydanticCustomError:
    # The message is the context's only entry: pydantic fills ``{placeholders}`` of the template
    # from the context, so braces in the user's value (``got {'a': 1}``) print as they are.
    return PydanticCustomError(kind, "{message}", {"message": message})


def _as_mapping(original: type[BaseModel]):
    """An instance of the original model (a default, say) -> its fields, to validate again."""
    def convert(value: Any) -> Any:
        if isinstance(value, original):
            return {k: getattr(value, k) for k in type(value).model_fields}
        return value
    return convert


def _to_original(original: type[BaseModel]):
    """Validated schema model -> the same values as an instance of the registered ``Params``."""
    def convert(value: BaseModel) -> BaseModel:
        if type(value) is original:
            return value
        values = {k: getattr(value, k) for k in original.model_fields if k in type(value).model_fields}
        return original.model_construct(_fields_set=set(value.model_fields_set), **values)
    return convert


def _prepare_run(data: Any, stage_training: Mapping[str, str]) -> Any:
    """Before validation: YAML keys as strings, null sections as empty, and each training
    stage's settings as the run's ``training`` with the stage's own keys over it."""
    if not isinstance(data, Mapping):
        return data
    data = {str(k): v for k, v in data.items()}
    for key in ("tasks", "stages"):
        if isinstance(data.get(key), Mapping):
            data[key] = {str(k): v for k, v in data[key].items()}
    run_training = {} if data.get("training") is None else data["training"]
    stages = data.get("stages")
    if isinstance(stages, Mapping) and isinstance(run_training, Mapping):
        merged_stages = {}
        for name, spec in stages.items():
            spec = {"kind": spec} if isinstance(spec, str) else spec
            field_name = training_field_of(spec, stage_training)
            if field_name is not None:
                own = spec.get(field_name)
                own = {} if own is None else own
                if isinstance(own, Mapping):
                    spec = {**spec, field_name: deep_merge(run_training, own)}
            merged_stages[name] = spec
        data["stages"] = merged_stages
    return data


def training_field_of(spec: Any, stage_training: Mapping[str, str]) -> str | None:
    """The StageTraining field of a stage's raw config (a mapping or a name), if its kind has one."""
    kind = spec if isinstance(spec, str) else spec.get("kind") if isinstance(spec, Mapping) else None
    return stage_training.get(kind) if isinstance(kind, str) else None


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _copy_field(info: FieldInfo, **changes: Any) -> FieldInfo:
    new = copy.copy(info)
    new.metadata = [m for m in info.metadata if not isinstance(m, (Component, StageTraining))]
    for key, value in changes.items():
        setattr(new, key, value)
    return new


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) in (list, tuple, set, frozenset) or annotation in (list, tuple)


def _admits_none(info: FieldInfo) -> bool:
    args = get_args(info.annotation)
    return (get_origin(info.annotation) is Union and type(None) in args) or info.default is None
