"""temperature: auto chooses tau per task on the validation split, one task at a time."""

from __future__ import annotations

import json

from click.testing import CliRunner

from distillkit.cli import cli
from tests.conftest import toy_config, write_config


def _run(tmp_path, monkeypatch, temperature, grid=(1.0, 4.0)):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    config = toy_config()
    config["training"].update(epochs=1)
    config["stages"]["m2"].update(temperature=temperature, temperature_grid=list(grid))
    del config["stages"]["m3"]
    config["stages"]["report"]["models"] = ["m1", "m2"]
    path = write_config(tmp_path, config)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    return result, path


def test_auto_picks_the_best_validation_score_and_records_it(tmp_path, monkeypatch):
    result, _ = _run(tmp_path, monkeypatch, {"cluster": "auto", "quadrant": "auto"})
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    search = metrics["m2"]["temperature_search"]
    assert search["split"] == "val" and search["grid"] == [1.0, 4.0]
    for task in ("cluster", "quadrant"):
        scores = search["scores"][task]
        assert set(scores) == {"1", "4"}
        best = max(scores.values())
        assert scores[f"{search['chosen'][task]:g}"] == best
    # the last task's winning trial is the final configuration: its validation score is the stage's
    last = search["scores"]["quadrant"][f"{search['chosen']['quadrant']:g}"]
    assert metrics["m2"]["val"]["m2"]["quadrant"]["accuracy"] == last
    stage = json.loads((tmp_path / "run" / "stages" / "m2" / "stage.json").read_text())
    assert stage["result"]["metrics"]["temperature_search"]["chosen"] == search["chosen"]
    plan = {p["name"]: p for p in json.loads((tmp_path / "run" / "plan.json").read_text())}
    assert plan["m2"]["temperature_chosen"] == search["chosen"]
    assert "auto(1/4, on val)" in plan["m2"]["description"]


def test_auto_is_validated_like_a_temperature(tmp_path, monkeypatch):
    result, path = _run(tmp_path, monkeypatch, "hot")
    assert result.exit_code == 2, result.output
    assert "stages.m2.temperature" in result.output


def test_auto_on_a_task_without_temperature_exits_2_with_its_path(tmp_path, monkeypatch):
    result, path = _run(tmp_path, monkeypatch, {"clustr": "auto"})
    assert result.exit_code == 2, result.output
    assert "stages.m2.temperature.clustr" in result.output and "Did you mean 'cluster'?" in result.output
    assert not (tmp_path / "run" / "stages").exists()


def test_auto_in_a_sweep_grid_is_checked_before_training(tmp_path):
    import yaml

    config = toy_config()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(
        {"base": "base.yaml", "grid": {"stages.m2.temperature": [{"quadrnt": "auto"}]}}))
    result = CliRunner().invoke(cli, ["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "grid.stages.m2.temperature" in result.output and "stages.m2.temperature.quadrnt" in result.output
    assert not (tmp_path / "out").exists()
