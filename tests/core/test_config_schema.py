"""The run config's schema, built from the registries: a third-party plugin's kinds and nested
components validate like the core's, with YAML paths and lines, and show in the JSON Schema."""

from __future__ import annotations

import json
import sys
import types
from typing import Annotated, Any

import pytest
import yaml
from click.testing import CliRunner
import pydantic
from pydantic import Field

from distillkit import Component, Encoder, EncoderParams, Loss, Params, Stage, StageTraining, Student
from distillkit.builtin.components import MLPParams
from distillkit.cli import cli
from distillkit.config import ConfigErrors, load_config, validate_component, validate_config
from distillkit.errors import DistillkitError
from distillkit.losses import KDLossParams
from distillkit.plugins import PluginManager, hookimpl, set_plugin_manager
from distillkit.schema import component_fields, config_schema, stage_training_field
from distillkit.training import TrainingParams


class WideParams(EncoderParams):
    kind: str = "wide"
    width: int = Field(8, ge=1)


class WideEncoder(Encoder):
    Params = WideParams


class ProbeParams(Params):
    kind: str = "probe"
    head: Annotated[Any, Component("encoder")] = {"kind": "mlp"}
    losses: Annotated[list[Any], Component("loss")] = []
    training: Annotated[Any, StageTraining()] = None


class ProbeStage(Stage):
    Params = ProbeParams


class LegacyParams(Params):
    kind: str = "legacy"
    enc: Any = None
    training: Any = None


class LegacyStage(Stage):
    """Declares its nested component and its training the older way, by class attributes."""

    Params = LegacyParams
    nested = {"enc": "encoder"}
    uses_training = True


class SumLossParams(Params):
    kind: str = "sum"
    parts: Annotated[list[Any], Component("loss")] = []  # nests its own kind


class SumLoss(Loss):
    Params = SumLossParams


def _plugin_module(name: str, **hooks: list[tuple[str, type]]) -> types.ModuleType:
    """A plugin module whose ``register_*`` hooks (the keyword names) register these kinds."""
    module = types.ModuleType(name)
    for hook, entries in hooks.items():
        def impl(register, _entries=entries):
            for kind, cls in _entries:
                register(kind, cls)

        impl.__name__ = hook
        setattr(module, hook, hookimpl(impl))
    return module


def _plugin():
    return _plugin_module("probe_plugin", register_encoders=[("wide", WideEncoder)],
                          register_losses=[("sum", SumLoss)],
                          register_stages=[("probe", ProbeStage), ("legacy", LegacyStage)])


@pytest.fixture
def registries():
    return PluginManager(autoload=False, plugins=[_plugin()]).registries


BAD = """\
name: plugin_run
data: {kind: toy_blobs}
tasks:
  cluster: {kind: classification}
student:
  kind: multitask
  encoder: {kind: wide, width: 0}
training:
  epochs: 0
stages:
  p:
    kind: probe
    head: {kind: wdie}
    losses:
      - kd
      - {kind: sum, parts: [{kind: kd, normalise_by_present: true}]}
    training: {batch_size: 0}
  old:
    kind: legacy
    enc: {kind: mlp, depht: 2}
"""


def test_plugin_kinds_and_nested_components_are_reported_together_with_paths_and_lines(tmp_path, registries):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigErrors) as err:
        load_config(path, registries)
    assert err.value.problems == [
        "student.encoder.width (line 7): Input should be greater than or equal to 1 (got 0)",
        "training.epochs (line 9): Input should be greater than or equal to 1 (got 0)",
        "stages.p.head.kind (line 13): unknown encoder 'wdie'. Did you mean 'wide'? Known encoders: mlp, wide.",
        "stages.p.losses.1.parts.0.normalise_by_present (line 16): unknown key 'normalise_by_present'. "
        "Did you mean 'normalize_by_present'? Valid keys: kind, normalize_by_present.",
        "stages.p.training.batch_size (line 17): Input should be greater than or equal to 1 (got 0)",
        "stages.old.enc.depht (line 20): unknown key 'depht'. Did you mean 'depth'? "
        "Valid keys: kind, freeze, in_features, hidden, depth, dropout.",
    ]


def test_shorthand_defaults_and_the_stage_training_merge_give_the_registered_params(registries):
    config = yaml.safe_load("""\
data: toy_blobs
tasks: {cluster: classification}
student: {kind: multitask, encoder: wide}
training: {epochs: 3, batch_size: 16}
stages:
  p: {kind: probe, head: wide, losses: [kd, {kind: sum, parts: [kd]}], training: {batch_size: 4}}
  old: {kind: legacy, enc: {kind: wide, width: 3}}
  s: probe
""")
    cfg = validate_config(config, registries)
    assert type(cfg.student.encoder) is WideParams and cfg.student.encoder.width == 8
    p, old, s = cfg.stages["p"], cfg.stages["old"], cfg.stages["s"]
    # the registered classes themselves, not the schema's generated subclasses
    assert type(p) is ProbeParams and type(p.head) is WideParams and p.head == WideParams()
    assert [type(x) for x in p.losses] == [KDLossParams, SumLossParams]
    assert p.losses[1].parts == [KDLossParams()]
    assert type(p.training) is TrainingParams and (p.training.epochs, p.training.batch_size) == (3, 4)
    assert type(old) is LegacyParams and old.enc == WideParams(width=3)
    assert type(old.training) is TrainingParams and (old.training.epochs, old.training.batch_size) == (3, 16)
    assert type(s) is ProbeParams and s.head == MLPParams() and s.losses == [] and s.training.batch_size == 16
    assert cfg.resolved()["stages"]["p"]["head"] == {"kind": "wide", "freeze": "none", "width": 8}


def test_nested_components_are_read_from_annotations_and_from_the_older_class_attributes(registries):
    assert component_fields(ProbeStage) == {"head": "encoder", "losses": "loss"} == ProbeStage.nested
    assert stage_training_field(ProbeStage) == "training"
    assert component_fields(LegacyStage) == {"enc": "encoder"} and stage_training_field(LegacyStage) == "training"
    assert Stage.nested == {} and Student.nested == {} and stage_training_field(Student) is None


def test_validate_component_reports_a_nested_mistake_under_its_path(registries):
    with pytest.raises(ConfigErrors) as err:
        validate_component("student", {"kind": "multitask", "encoder": {"kind": "wide", "width": 0}}, registries)
    assert err.value.problems == ["student.encoder.width: Input should be greater than or equal to 1 (got 0)"]
    with pytest.raises(ConfigErrors) as err:
        validate_component("loss", {"kind": "sum", "parts": [{"kind": "sum", "parts": [{}]}]}, registries,
                           path="stages.m.loss")
    assert err.value.problems == ["stages.m.loss.parts.0.parts.0: missing 'kind'. Known losses: kd, sum."]


def test_a_marker_naming_no_registry_kind_is_one_clear_error():
    class BadParams(Params):
        kind: str = "bad"
        enc: Annotated[Any, Component("encodr")] = None

    class Bad(Stage):
        Params = BadParams

    module = _plugin_module("bad_plugin", register_stages=[("bad", Bad)])
    registries = PluginManager(autoload=False, plugins=[module]).registries
    with pytest.raises(DistillkitError, match="stage 'bad': field 'enc' nests a component of kind 'encodr', "
                                              "which is not a registry kind. Did you mean 'encoder'?"):
        config_schema(registries)


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].split("/")[-1]]
    return node


def _union(schema: dict, node: dict, optional: bool = False) -> tuple[list[str], dict[str, dict]]:
    """The shorthand names and ``{kind: member schema}`` of a component place."""
    shorthand, union, *rest = node["anyOf"]
    assert rest == ([{"type": "null"}] if optional else [])
    assert union["discriminator"]["propertyName"] == "kind"
    members = {kind: _resolve(schema, {"$ref": ref}) for kind, ref in union["discriminator"]["mapping"].items()}
    assert [m["$ref"] for m in union["oneOf"]] == list(union["discriminator"]["mapping"].values())
    for kind, member in members.items():
        assert member["properties"]["kind"]["const"] == kind and "kind" in member["required"]
        assert member["additionalProperties"] is False
    return shorthand["enum"], members


def test_schema_command_prints_a_union_on_kind_with_the_plugins_kinds(registries):
    set_plugin_manager(PluginManager(autoload=False, plugins=[_plugin()]))
    try:
        result = CliRunner().invoke(cli, ["schema"])
    finally:
        set_plugin_manager(None)
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    props = schema["properties"]
    assert set(props) == {"name", "seed", "device", "cache_dir", "data", "split", "tasks", "student", "training",
                          "stages"} and schema["additionalProperties"] is False
    assert set(schema["required"]) == {"data", "tasks", "student", "stages"}
    names, stages = _union(schema, props["stages"]["additionalProperties"])
    assert names == registries.stage.names() == sorted(stages) == ["distill", "ensemble", "evaluate", "legacy",
                                                                   "probe", "train"]
    names, encoders = _union(schema, stages["probe"]["properties"]["head"])
    assert names == ["mlp", "wide"] and encoders["wide"]["properties"]["width"]["minimum"] == 1
    _, losses = _union(schema, stages["probe"]["properties"]["losses"]["items"])
    assert sorted(losses) == ["kd", "sum"]
    assert sorted(_union(schema, losses["sum"]["properties"]["parts"]["items"])[1]) == ["kd", "sum"]
    assert sorted(_union(schema, stages["legacy"]["properties"]["enc"], optional=True)[1]) == ["mlp", "wide"]
    training = [_resolve(schema, t) for t in stages["probe"]["properties"]["training"]["anyOf"]]
    assert training[1] == {"type": "null"} and "batch_size" in training[0]["properties"]
    _, students = _union(schema, props["student"])
    assert sorted(_union(schema, students["multitask"]["properties"]["encoder"])[1]) == ["mlp", "wide"]
    assert sorted(_union(schema, props["data"])[1]) == registries.dataset.names()


def test_the_docs_nested_params_example_validates_as_written(monkeypatch):
    from tests.test_plugins_doc import DOC, doc_examples

    example = types.ModuleType("doc_example_nested_params")  # importable, as a plugin's module is
    monkeypatch.setitem(sys.modules, example.__name__, example)
    exec(compile(doc_examples(DOC.read_text())["nested-params"], "docs/plugins.md", "exec", dont_inherit=True),
         example.__dict__)

    class TwoTower(Student):
        Params = example.TwoTowerParams

    class MyStage(Stage):
        Params = example.MyStageParams

    module = _plugin_module("doc_nested", register_students=[("two_tower", TwoTower)],
                            register_stages=[("my_stage", MyStage)])
    registries = PluginManager(autoload=False, plugins=[module]).registries
    config = {"data": "toy_blobs", "tasks": {"t": "classification"}, "training": {"epochs": 2},
              "student": {"kind": "two_tower", "side": None, "extra_losses": ["kd"]},
              "stages": {"m": {"kind": "my_stage", "training": {"epochs": 5}}, "n": "my_stage"}}
    cfg = validate_config(config, registries)
    assert cfg.student.encoder == MLPParams() and cfg.student.side is None
    assert cfg.student.extra_losses == [KDLossParams()]
    assert cfg.stages["m"].loss == KDLossParams() and cfg.stages["m"].training.epochs == 5
    assert cfg.stages["n"].training.epochs == 2
    config["student"]["side"] = {"kind": "mlp", "hiden": 3}
    with pytest.raises(ConfigErrors, match=r"student.side.hiden: unknown key 'hiden'. Did you mean 'hidden'\?"):
        validate_config(config, registries)


def test_a_stage_training_that_is_no_mapping_and_a_run_training_of_null(registries):
    config = {"data": "toy_blobs", "tasks": {"t": "classification"}, "student": "multitask", "training": None,
              "stages": {"p": {"kind": "probe", "training": [1]}, "q": {"kind": "probe", "training": {"epochs": 2}}}}
    with pytest.raises(ConfigErrors) as err:
        validate_config(config, registries)
    assert err.value.problems == ["stages.p.training: must be a mapping of training settings."]
    del config["stages"]["p"]
    cfg = validate_config(config, registries)
    assert cfg.training == TrainingParams() and cfg.stages["q"].training == TrainingParams(epochs=2)


class ShareParams(EncoderParams):
    kind: str = "share"
    weights: list[float] = [0.5, 0.5]
    scale: float = 1.0

    @pydantic.field_validator("weights")
    @classmethod
    def _sums_to_one(cls, value):
        if abs(sum(value) - 1) > 1e-9:
            raise ValueError(f"the weights must sum to 1 (got {value})")
        return value

    @pydantic.field_validator("scale")
    @classmethod
    def _positive(cls, value):
        if value <= 0:
            raise ValueError("must be positive")
        return value


class ShareEncoder(Encoder):
    Params = ShareParams


def test_a_plugins_own_message_that_shows_the_value_is_not_given_it_twice():
    module = _plugin_module("share_plugin", register_encoders=[("share", ShareEncoder)])
    registries = PluginManager(autoload=False, plugins=[module]).registries
    with pytest.raises(ConfigErrors) as caught:
        validate_component("encoder", {"kind": "share", "weights": [0.9, 0.2], "scale": -1}, registries,
                           path="student.encoder")
    assert caught.value.problems == [
        "student.encoder.weights: Value error, the weights must sum to 1 (got [0.9, 0.2])",
        "student.encoder.scale: Value error, must be positive (got -1)",
    ]
