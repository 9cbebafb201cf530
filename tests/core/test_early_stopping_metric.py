"""A run-level early-stopping metric of one task, with subset teachers that do not learn it."""
from __future__ import annotations

import json

from click.testing import CliRunner

from distillkit.cli import cli
from tests.conftest import toy_config, write_config


def _run(tmp_path, monkeypatch, metric):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    config = toy_config()
    config["training"].update(epochs=2, early_stopping={"metric": metric, "patience": 5})
    config["stages"] = {"teachers": config["stages"]["teachers"], "m1": {"kind": "train"}}
    path = write_config(tmp_path, config)
    return CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])


def test_teachers_without_the_metrics_task_stop_on_their_validation_loss(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch, "cluster.balanced_accuracy")
    assert result.exit_code == 0, result.output
    logs = {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in (tmp_path / "run").rglob("log.jsonl")}
    monitors = {name: set().union(*(row.get("monitor", {}).keys() for row in rows)) for name, rows in logs.items()}
    # the {quadrant} teacher has no cluster head: it monitors its own validation loss; every
    # model that learns cluster monitors the asked-for metric
    assert any(m == {"val_loss"} for m in monitors.values()), monitors
    assert sum(m == {"cluster.balanced_accuracy"} for m in monitors.values()) >= 2, monitors


def test_a_metric_of_no_task_exits_2_before_training(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch, "clustr.balanced_accuracy")
    assert result.exit_code == 2, result.output
    assert "training.early_stopping.metric" in result.output and "Did you mean 'cluster'?" in result.output
    # the run's one key, inherited by every training stage, is reported once
    assert result.output.count("early_stopping.metric") == 1, result.output
    assert not (tmp_path / "run" / "stages").exists()


def test_a_misspelt_metric_key_exits_2_after_one_epoch_naming_the_real_keys(tmp_path, monkeypatch):
    result = _run(tmp_path, monkeypatch, "cluster.acuracy")
    assert result.exit_code == 2, result.output
    assert "'cluster.acuracy' is not among the validation results. Did you mean 'cluster.accuracy'?" in result.output
    known = result.output.split("Known: ", 1)[1]
    assert "cluster.accuracy" in known and "cluster.balanced_accuracy" in known
    assert "cluster.n" not in known  # a count is not a score to stop on
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "stages" / "m1").exists()  # no stage finished with it
