"""End-to-end runs of the toy example through the runner and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from distillkit.checkpoint import load_model_state
from distillkit.cli import cli
from distillkit.config import load_config
from distillkit.errors import DistillkitError
from distillkit.runner import RunLock, Runner
from tests.conftest import REPO, m3_weights_with_and_without_labels, toy_config, write_config


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch, fresh_plugin_manager, cache_dir):
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")


def test_run_writes_run_directory_and_rerun_skips(tmp_path, runner):
    config = write_config(tmp_path, toy_config())
    out = tmp_path / "run"
    result = runner.invoke(cli, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"teachers", "m1", "m2", "m3", "report"}
    assert set(metrics["m1"]) == {"val", "test"}
    acc = metrics["report"]["test"]["m1"]["cluster"]["accuracy"]
    assert 0.5 < acc <= 1.0  # 4 clusters: well above chance after 3 epochs
    assert (out / "stages" / "m1" / "model.safetensors").exists()
    _, meta = load_model_state(out / "stages" / "m1" / "model.safetensors")
    assert meta["inputs"] == {"shape": [8], "dtype": "float32"}
    assert meta["tasks"]["cluster"]["state"]["classes"] == ["c0", "c1", "c2", "c3"]
    assert len(list((out / "stages" / "teachers").glob("*/model.safetensors"))) == 2
    assert (out / "config.yaml").exists() and (out / "summary.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["header"][:2] == ["model", "cluster accuracy"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    again = runner.invoke(cli, ["run", str(config), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped") == 5
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before

    # changing one stage re-runs it and the stages after it, not the ones before
    third = runner.invoke(cli, ["run", str(config), "--out", str(out), "--set", "stages.m3.temperature=3"])
    assert third.exit_code == 0, third.output
    assert third.output.count("skipped") == 3  # teachers, m1, m2
    assert (out / "stages" / ".previous" / "m3" / "model.safetensors").exists()


def test_validate_prints_plan_and_trains_nothing(tmp_path, runner):
    result = runner.invoke(cli, ["validate", str(REPO / "examples" / "toy.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    plan = [l.strip() for l in lines[lines.index("plan:") + 1:]]
    assert plan[0].startswith("1. teachers: train 2 teachers")
    assert plan[2].startswith("3. m2: distill on labeled data from m1") and "teachers m1, teachers (mean)" in plan[2]
    assert plan[3].startswith("4. m3: distill on unlabeled data from m2")
    assert not (tmp_path / "runs").exists()


def test_plugins_command_lists_builtin_components(runner):
    result = runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "builtin" in result.output
    assert "tasks: classification" in result.output
    assert "stages: distill, ensemble, evaluate, train" in result.output


@pytest.mark.parametrize("args, expected", [
    (["run", "missing.yaml"], "does not exist"),
    (["validate", "{bad}"], "unknown dataset"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, runner, args, expected):
    if args[1] == "{bad}":
        config = toy_config()
        config["data"]["kind"] = "toy"
        args = [args[0], str(write_config(tmp_path, config))]
    result = runner.invoke(cli, args)
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")


def _cycle(config: dict) -> None:
    config["stages"]["m1"]["init"] = "m3"  # m1 <- m3 <- m2 <- m1


def _unknown_teacher(config: dict) -> None:
    config["stages"]["m3"]["teachers"] = ["m9"]


def _untaught_task(config: dict) -> None:
    config["stages"]["m1"]["tasks"] = ["quadrant"]
    config["stages"]["m2"]["teachers"] = ["m1"]


@pytest.mark.parametrize("edit, expected", [
    (_cycle, "cycle: m1 -> m3 -> m2 -> m1"),
    (_unknown_teacher, "stages.m3: refers to stage 'm9', which does not exist"),
    (_untaught_task, "no teacher of stage 'm2' learned task(s) cluster (teachers: m1)"),
])
def test_plan_is_checked_before_any_data_is_loaded(tmp_path, runner, monkeypatch, edit, expected):
    """A broken plan fails with exit 2 before the dataset source reads anything."""
    from distillkit.builtin.toy import ToyBlobs

    calls = []

    def load(self):
        calls.append(self)
        raise AssertionError("the dataset was loaded before the plan was checked")

    monkeypatch.setattr(ToyBlobs, "load", load)
    config = toy_config()
    edit(config)
    out = tmp_path / "run"
    result = runner.invoke(cli, ["run", str(write_config(tmp_path, config)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and expected in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert calls == []
    assert not out.exists() or not any((out / "stages").glob("*"))
    # control: the same patch does stop a valid config, so the plan check is what stopped these
    control = runner.invoke(cli, ["run", str(write_config(tmp_path, toy_config(), "ok.yaml")),
                                  "--out", str(tmp_path / "ok")])
    assert control.exit_code != 0 and len(calls) == 1


def test_debug_flag_shows_the_traceback(runner):
    result = runner.invoke(cli, ["--debug", "run", "missing.yaml"])
    assert isinstance(result.exception, DistillkitError)


def test_out_pointing_to_a_file_is_refused(tmp_path, runner):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    result = runner.invoke(cli, ["run", str(write_config(tmp_path, toy_config())), "--out", str(target)])
    assert result.exit_code == 2 and "is a file" in result.output
    assert target.read_text() == "keep me"


def test_second_run_into_the_same_directory_is_refused(tmp_path, core_registries):
    cfg = load_config(write_config(tmp_path, toy_config()), core_registries)
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        with pytest.raises(DistillkitError, match="another distillkit run"):
            Runner(cfg, core_registries, out).run()
    # the lock is released with its holder: a later run proceeds
    with RunLock(out):
        pass


def test_unlabeled_distillation_reads_no_label(tmp_path, core_registries):
    """M3 trained with every label scrambled gives bit-identical weights: it reads none."""
    config = toy_config()
    config["stages"] = {"m1": {"kind": "train"},
                        "m3": {"kind": "distill", "init": "m1", "teachers": ["m1"], "data": "unlabeled",
                               "temperature": 2.0}}
    cfg = load_config(write_config(tmp_path, config), core_registries)
    a, b = m3_weights_with_and_without_labels(cfg, core_registries, tmp_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # m1 (which does read labels) was reused, not retrained, in the scrambled run
    assert (tmp_path / "b" / "stages" / "m1" / "stage.json").read_text() == \
        (tmp_path / "a" / "stages" / "m1" / "stage.json").read_text()
    # control: the same scrambling does change a stage that reads labels
    a, b = m3_weights_with_and_without_labels(cfg, core_registries, tmp_path / "control", stage="m1")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_teacher_weights_unchanged_by_distillation(tmp_path, core_registries, monkeypatch):
    """The teachers a distillation stage actually used hold, after it, the weights (and buffers)
    of an independent copy of the checkpoint loaded before the stage ran."""
    from distillkit.stages import StageContext

    config = toy_config()
    config["stages"] = {"m1": {"kind": "train"},
                        "m2": {"kind": "distill", "init": "m1", "teachers": ["m1"],
                               "teacher_outputs": {"mode": "online"}}}
    cfg = load_config(write_config(tmp_path, config), core_registries)
    first = {**config, "stages": {"m1": config["stages"]["m1"]}}
    Runner(load_config(write_config(tmp_path, first, "first.yaml"), core_registries), core_registries,
           tmp_path / "run").run()
    path = tmp_path / "run" / "stages" / "m1" / "model.safetensors"
    before, _ = load_model_state(path)
    before = {k: v.clone() for k, v in before.items()}
    used = []
    real = StageContext.teachers

    def spy(self, stages):
        teachers = real(self, stages)
        used.extend(teachers)
        return teachers

    monkeypatch.setattr(StageContext, "teachers", spy)
    runner = Runner(cfg, core_registries, tmp_path / "run")
    runner.run()
    assert used, "the distillation stage loaded no teacher"
    for teacher in used:
        state = teacher.model.state_dict()
        assert set(state) == set(before)
        for key, value in state.items():
            assert torch.equal(value.cpu(), before[key]), key
    after, _ = load_model_state(path)
    assert all(torch.equal(after[k], before[k]) for k in before)  # nor was the checkpoint rewritten
    m2, _ = load_model_state(tmp_path / "run" / "stages" / "m2" / "model.safetensors")
    assert any(not torch.equal(before[k], m2[k]) for k in before)  # the student did move


def test_stage_key_covers_only_the_tasks_it_touches(tmp_path, runner):
    config = toy_config()
    config["stages"] = {"only_cluster": {"kind": "train", "tasks": ["cluster"]}, "both": {"kind": "train"}}
    path = write_config(tmp_path, config)
    out = tmp_path / "run"
    assert runner.invoke(cli, ["run", str(path), "--out", str(out)]).exit_code == 0
    again = runner.invoke(cli, ["run", str(path), "--out", str(out), "--set", "tasks.quadrant.hidden=16"])
    assert again.exit_code == 0, again.output
    assert "stage only_cluster: already finished" in again.output
    assert "stage both: already finished" not in again.output


def test_augmentation_needs_online_teachers(tmp_path, runner):
    config = toy_config()
    config["stages"] = {"m1": {"kind": "train"},
                        "m2": {"kind": "distill", "init": "m1", "teachers": ["m1"],
                               "training": {"augment": {"kind": "gaussian_noise", "std": 0.3}}}}
    result = runner.invoke(cli, ["validate", str(write_config(tmp_path, config))])
    assert result.exit_code == 2 and "stages.m2.teacher_outputs.mode: online" in result.output
    config["stages"]["m2"]["teacher_outputs"] = {"mode": "online"}
    result = runner.invoke(cli, ["run", str(write_config(tmp_path, config)), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    bad = toy_config()
    bad["training"]["augment"] = {"kind": "gausian_noise"}
    result = runner.invoke(cli, ["validate", str(write_config(tmp_path, bad))])
    assert result.exit_code == 2 and "training.augment.kind" in result.output and "gaussian_noise" in result.output


def test_a_failed_rerun_keeps_earlier_results_in_metrics_json(tmp_path, runner, monkeypatch):
    path = write_config(tmp_path, toy_config())
    out = tmp_path / "run"
    assert runner.invoke(cli, ["run", str(path), "--out", str(out)]).exit_code == 0
    before = json.loads((out / "metrics.json").read_text())

    from distillkit import stages

    def broken(self, ctx, workdir):
        raise DistillkitError("simulated failure")

    monkeypatch.setattr(stages.DistillStage, "run", broken)
    result = runner.invoke(cli, ["run", str(path), "--out", str(out), "--set", "stages.m2.temperature=4"])
    assert result.exit_code == 2 and "simulated failure" in result.output
    after = json.loads((out / "metrics.json").read_text())
    assert after == before  # m2, m3 and report were not reached: their earlier results stay


def test_each_stage_trains_on_its_split_and_selects_on_validation(tmp_path, core_registries, monkeypatch):
    """M1/M2 fit the labeled training split, M3 the unlabeled pool; every stage picks its best
    epoch on the validation split (never the test split)."""
    import distillkit.stages as stages_module

    config = toy_config()
    config["stages"] = {"m1": {"kind": "train"},
                        "m2": {"kind": "distill", "init": "m1", "teachers": ["m1"], "data": "labeled"},
                        "m3": {"kind": "distill", "init": "m2", "teachers": ["m2"], "data": "unlabeled"}}
    config["training"]["epochs"] = 1
    cfg = load_config(write_config(tmp_path, config), core_registries)
    seen = {}
    real_fit = stages_module.fit

    def spy(model, tasks, loss_fn, train, val, *args, stage=None, **kwargs):
        seen[stage] = (train.indices.copy(), val.indices.copy())
        return real_fit(model, tasks, loss_fn, train, val, *args, stage=stage, **kwargs)

    monkeypatch.setattr(stages_module, "fit", spy)
    runner = Runner(cfg, core_registries, tmp_path / "run")
    runner.run()
    splits = {name: set(split.indices.tolist()) for name, split in runner.splits.items()}
    assert splits["unlabeled"] and not splits["unlabeled"] & splits["train"]
    assert splits["val"] != splits["test"]
    expected_train = {"m1": "train", "m2": "train", "m3": "unlabeled"}
    assert set(seen) == set(expected_train)
    for stage, (train, val) in seen.items():
        assert set(train.tolist()) == splits[expected_train[stage]], stage
        assert set(val.tolist()) == splits["val"], stage


def test_a_long_model_label_folds_in_the_summary_table_rather_than_being_cut(capsys):
    from distillkit.progress import Reporter

    label = "ensemble[price+price_quantiles+band]"
    header = ["model"] + [f"task{i} balanced accuracy" for i in range(6)]
    Reporter().table("test", header, [[label] + ["0.123"] * 6])
    lines = capsys.readouterr().out.splitlines()
    first_column = "".join(line.split("│")[1].strip() for line in lines if line.startswith("│"))
    assert first_column == label
