"""Config loading and validation: every error at once, with paths, lines and suggestions."""

from __future__ import annotations

import pytest

from distillkit.config import ConfigErrors, apply_overrides, load_config, read_yaml, validate_config
from distillkit.errors import DistillkitError
from distillkit.runner import plan
from tests.conftest import REPO, toy_config, write_config


def test_toy_example_validates(core_registries):
    cfg = load_config(REPO / "examples" / "toy.yaml", core_registries)
    assert list(cfg.tasks) == ["cluster", "quadrant"]
    assert cfg.stages["m2"].alpha == 0.95
    assert cfg.stages["m2"].aggregation.kind == "mean"
    # the stage inherits the run's training defaults
    assert cfg.stages["m1"].training.batch_size == 32
    assert cfg.stages["m1"].training.optimizer.kind == "adam"


def test_all_errors_reported_together_with_paths_and_lines(tmp_path, core_registries):
    text = """\
name: broken
data:
  kind: toy_blob
tasks:
  cluster: {kind: classification, hiden: 3}
student:
  kind: multitask
  encoder: {kind: mlp, hidden: -1}
training:
  batch_size: many
stages:
  m2:
    kind: distill
    teachers: [m1]
    alpha: 1.5
    temperature: -1
"""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigErrors) as err:
        load_config(path, core_registries)
    problems = err.value.problems
    joined = "\n".join(problems)
    assert "data.kind (line 3): unknown dataset 'toy_blob'. Did you mean 'toy_blobs'?" in joined
    assert "tasks.cluster.hiden (line 5): unknown key 'hiden'. Did you mean 'hidden'?" in joined
    assert any(p.startswith("student.encoder.hidden (line 8)") for p in problems)
    assert any(p.startswith("training.batch_size (line 10)") for p in problems)
    assert any(p.startswith("stages.m2.alpha (line 15)") and "less than or equal to 1" in p for p in problems)
    assert any(p.startswith("stages.m2.temperature (line 16)") and "> 0" in p for p in problems)
    assert len(problems) == 6
    assert str(path) in err.value.render()


def test_unknown_stage_reference_and_cycle(tmp_path, core_registries):
    config = toy_config()
    config["stages"] = {"m2": {"kind": "distill", "teachers": ["m11"], "init": "m1"},
                        "m1": {"kind": "train"}}
    cfg = load_config(write_config(tmp_path, config), core_registries)
    with pytest.raises(DistillkitError, match="'m11', which does not exist. Did you mean 'm1'"):
        plan(cfg, core_registries)
    config["stages"] = {"a": {"kind": "train", "init": "b"}, "b": {"kind": "train", "init": "a"}}
    cfg = load_config(write_config(tmp_path, config), core_registries)
    with pytest.raises(DistillkitError, match="cycle: a -> b -> a"):
        plan(cfg, core_registries)


def test_unknown_task_in_stage_and_missing_teacher_for_task(tmp_path, core_registries):
    config = toy_config()
    config["stages"] = {"m1": {"kind": "train", "tasks": ["clustr"]}}
    cfg = load_config(write_config(tmp_path, config), core_registries)
    with pytest.raises(DistillkitError, match="unknown task 'clustr'. Did you mean 'cluster'"):
        plan(cfg, core_registries)
    config["stages"] = {"t": {"kind": "train", "tasks": ["cluster"]},
                        "s": {"kind": "distill", "teachers": ["t"]}}
    cfg = load_config(write_config(tmp_path, config), core_registries)
    with pytest.raises(DistillkitError, match="no teacher of stage 's' learned task\\(s\\) quadrant"):
        plan(cfg, core_registries)


def test_overrides_parse_yaml_values():
    data = apply_overrides({"training": {"epochs": 3}}, ["training.epochs=7", "stages.m2.temperature={a: 2}",
                                                         "name=x"])
    assert data == {"training": {"epochs": 7}, "stages": {"m2": {"temperature": {"a": 2}}}, "name": "x"}
    with pytest.raises(DistillkitError, match="key.path=value"):
        apply_overrides({}, ["epochs"])


def test_set_override_is_validated_like_the_file(tmp_path, core_registries):
    path = write_config(tmp_path, toy_config())
    cfg = load_config(path, core_registries, ["training.epochs=2", "stages.m2.temperature=5"])
    assert cfg.stages["m2"].training.epochs == 2
    assert cfg.stages["m2"].temperature == 5
    with pytest.raises(ConfigErrors, match="stages.m2.alpha"):
        load_config(path, core_registries, ["stages.m2.alpha=-0.1"])


def test_yaml_cannot_execute_code(tmp_path, core_registries):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(DistillkitError, match="invalid YAML"):
        read_yaml(path)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\ntasks: [unclosed\n")
    with pytest.raises(DistillkitError) as err:
        read_yaml(path)
    assert f"{path}:3" in err.value.render() or f"{path}:2" in err.value.render()


def test_stage_training_override_only_reports_own_keys(tmp_path, core_registries):
    config = toy_config()
    config["training"]["epochs"] = 0  # invalid in the defaults: reported once, at training.epochs
    config["stages"]["m1"] = {"kind": "train", "training": {"batch_size": 0}}
    with pytest.raises(ConfigErrors) as err:
        validate_config(config, core_registries)
    paths = [p.split(":")[0].split(" ")[0] for p in err.value.problems]
    assert paths.count("training.epochs") == 1
    assert "stages.m1.training.batch_size" in paths
    assert not any(p.startswith("stages.m2.training") for p in paths)


def test_missing_sections_and_unknown_top_level_key(core_registries):
    with pytest.raises(ConfigErrors) as err:
        validate_config({"stagez": {}}, core_registries)
    joined = "\n".join(err.value.problems)
    assert "unknown top-level key 'stagez'. Did you mean 'stages'?" in joined
    for section in ("data", "tasks", "student", "stages"):
        assert f"missing required section '{section}'" in joined
