"""``distillkit eval`` against a run's own evaluate stage; ``predict`` and ``eval-manifest`` of the eye plugin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from distillkit.cli import cli
from distillkit.io import read_json
from distillkit.plugins import get_plugin_manager, set_plugin_manager
from tests.tiny_runs import Environment, make_run, tiny_eye_config, tiny_toy_config


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


# -- eval (the core, on the toy run) -----------------------------------------------------------

@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    with Environment(DISTILLKIT_CACHE=str(folder / "cache"), DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD="1"):
        yield make_run(tiny_toy_config(), folder)


@pytest.fixture
def core_only(toy_run, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(toy_run.parent / "cache"))
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    set_plugin_manager(None)
    yield toy_run
    set_plugin_manager(None)


def test_eval_of_a_run_equals_its_evaluate_stage(core_only, tmp_path, monkeypatch):
    run = core_only
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: the table's titles stay on one line
    out = tmp_path / "eval.json"
    result = invoke("eval", run, "--group-by", "cluster", "--json", out)
    assert result.exit_code == 0, result.output
    assert "cluster accuracy" in result.output and "m3" in result.output
    saved = read_json(out)
    recorded = read_json(run / "metrics.json")["report"]["test"]
    assert saved["split"] == "test" and list(saved["metrics"]) == ["m1", "m2", "m3"]
    for label, metrics in recorded.items():
        assert saved["metrics"][label]["cluster"]["accuracy"] == metrics["cluster"]["accuracy"]
        assert saved["metrics"][label] == metrics  # every number, the confusion matrices and by_group too


def test_eval_of_one_checkpoint_on_another_split_and_on_all_rows(core_only, tmp_path):
    run = core_only
    checkpoint = run / "stages" / "m1" / "model.safetensors"
    result = invoke("eval", checkpoint, "--data", run.parent / "config.yaml", "--split", "val", "--json", "-")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output[result.output.index("{"):])
    val = read_json(run / "metrics.json")["m1"]["val"]["m1"]  # recorded by the train stage itself
    for task in ("cluster", "quadrant"):
        assert printed["metrics"]["m1"][task] == val[task]

    # a data-only file, every labeled row: 200 items, of which 10% miss their quadrant label
    data_only = tmp_path / "data.yaml"
    data_only.write_text(yaml.safe_dump({"data": tiny_toy_config()["data"]}))
    result = invoke("eval", checkpoint, "--data", data_only, "--split", "all", "--json", tmp_path / "all.json")
    assert result.exit_code == 0, result.output
    metrics = read_json(tmp_path / "all.json")["metrics"]["m1"]
    assert metrics["cluster"]["n"] == 200 and 150 < metrics["quadrant"]["n"] < 200


@pytest.mark.parametrize("args, message", [
    (["{ckpt_copy}"], "give --data"),
    (["{ckpt}", "--data", "{csv}"], "not a YAML config"),
    (["{run}", "--stage", "m9"], "no stage 'm9'"),
    (["{ckpt}", "--data", "{data_yaml}", "--set", "data.kind=blobs"], "unknown dataset 'blobs'"),
])
def test_eval_user_errors_exit_2(core_only, tmp_path, args, message):
    run = core_only
    copy = tmp_path / "m1.safetensors"
    shutil.copy(run / "stages" / "m1" / "model.safetensors", copy)
    (tmp_path / "rows.csv").write_text("image,label\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": tiny_toy_config()["data"]}))
    names = {"ckpt_copy": copy, "ckpt": run / "stages" / "m1" / "model.safetensors", "csv": tmp_path / "rows.csv",
             "run": run, "data_yaml": tmp_path / "data.yaml"}
    result = invoke("eval", *[a.format(**names) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


# -- predict and eval-manifest (the eye plugin, on a tiny synthetic run) -----------------------

@pytest.fixture(scope="module")
def eye_run(tmp_path_factory):
    pytest.importorskip("eye_fundus")
    folder = tmp_path_factory.mktemp("eye")
    with Environment(DISTILLKIT_CACHE=str(folder / "cache"), DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD=None):
        yield make_run(tiny_eye_config(), folder)


@pytest.fixture
def eye(eye_run, monkeypatch):
    from eye_fundus.commands import add_commands

    monkeypatch.setenv("DISTILLKIT_CACHE", str(eye_run.parent / "cache"))
    monkeypatch.delenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    set_plugin_manager(None)
    add_commands(cli)  # what `distillkit` (main) does through the register_commands hook
    yield eye_run
    set_plugin_manager(None)


def _test_images(run: Path, folder: Path, count: int = 4):
    """The first test-split images of the run, as PNG files (32 px, so decoding resizes nothing)."""
    from distillkit.rundir import RunDirectory

    rundir = RunDirectory(run)
    data = rundir.load_data(get_plugin_manager().registries)
    rows = data.rows("test")[:count]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(rows):
        path = folder / f"eye{i}.png"
        Image.fromarray(data.dataset.inputs[row].permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths, data, rows


def test_predict_json_from_the_checkpoint_alone(eye, tmp_path):
    from distillkit.models import load_model

    paths, data, rows = _test_images(eye, tmp_path / "images")
    checkpoint = eye / "stages" / "m3" / "model.safetensors"
    result = invoke("predict", checkpoint, tmp_path / "images", "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)
    assert [p["image"] for p in predictions] == [str(p) for p in paths]
    loaded = load_model(checkpoint, get_plugin_manager().registries)
    with torch.no_grad():
        feats = loaded.model.features(data.dataset.inputs[torch.as_tensor(rows)])
        broad = loaded.tasks["broad"].predict(loaded.model.heads["broad"], feats)["probs"]
    for i, p in enumerate(predictions):
        tasks = p["tasks"]
        assert set(tasks) == {"broad", "fine", "text"}
        for name in ("broad", "fine"):
            probs = tasks[name]["probabilities"]
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
            top = [t["probability"] for t in tasks[name]["top"]]
            assert top == sorted(top, reverse=True) and top[0] == pytest.approx(max(probs.values()))
        assert len(tasks["broad"]["top"]) == 1 and len(tasks["fine"]["top"]) == 5  # the tasks' own topk
        assert isinstance(tasks["text"]["text"], str)
        # the PNG holds the very pixels of the test image: the same probabilities as in the run
        classes = loaded.tasks["broad"].classes
        assert [tasks["broad"]["probabilities"][c] for c in classes] == pytest.approx(broad[i].tolist(), abs=1e-6)

    text = invoke("predict", checkpoint, paths[0])
    assert text.exit_code == 0, text.output
    assert text.output.splitlines()[0] == str(paths[0]) and "  text  " in text.output


def test_predict_image_size_comes_from_the_checkpoint_the_run_or_the_default(eye, tmp_path):
    from distillkit.checkpoint import load_model_state
    from eye_fundus.predict import DEFAULT_IMAGE_SIZE, image_size_for

    checkpoint = eye / "stages" / "m1" / "model.safetensors"
    _, meta = load_model_state(checkpoint)
    assert meta["inputs"] == {"shape": [3, 32, 32], "dtype": "uint8"}
    alone = tmp_path / "alone.safetensors"
    shutil.copy(checkpoint, alone)
    assert image_size_for(alone, meta) == (32, "the checkpoint")  # the file alone is enough
    # older files without the input shape: the run's config, else the default
    assert image_size_for(checkpoint, {}) == (32, str(eye.resolve() / "config.yaml"))
    assert image_size_for(alone, {})[0] == DEFAULT_IMAGE_SIZE
    paths, _, _ = _test_images(eye, tmp_path / "images", 1)
    result = invoke("predict", alone, paths[0])
    assert result.exit_code == 0 and "using" not in result.output


def test_predict_user_errors_exit_2(eye, tmp_path):
    paths, _, _ = _test_images(eye, tmp_path / "images", 1)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    checkpoint = eye / "stages" / "m1" / "model.safetensors"
    result = invoke("predict", checkpoint, paths[0], broken)
    assert result.exit_code == 2 and "broken.jpg" in result.output and "Traceback" not in result.output
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04not a safetensors file")
    result = invoke("predict", pickle, paths[0])
    assert result.exit_code == 2 and "not a .safetensors file" in result.output
    result = invoke("predict", checkpoint, tmp_path / "missing.png")
    assert result.exit_code == 2 and "missing.png" in result.output


def test_eval_manifest_agrees_with_predict(eye, tmp_path):
    paths, data, rows = _test_images(eye, tmp_path / "images", 6)
    broad = data.dataset.labels["broad_label"]
    manifest = tmp_path / "manifest.csv"
    lines = ["image,patient_id,broad_label,fine_label,diagnosis_text"]
    lines += [f"images/{p.name},p{i},{broad[r]},,{'' if i % 2 else 'some words'}" for i, (p, r) in
              enumerate(zip(paths, rows))]
    manifest.write_text("\n".join(lines) + "\n")
    checkpoint = eye / "stages" / "m1" / "model.safetensors"
    result = invoke("eval-manifest", checkpoint, manifest, "--json", tmp_path / "m.json")
    assert result.exit_code == 0, result.output
    metrics = read_json(tmp_path / "m.json")["metrics"]["m1"]
    assert metrics["broad"]["n"] == 6 and metrics["text"]["n"] == 3 and metrics["fine"]["n"] == 0
    predicted = json.loads(invoke("predict", checkpoint, *paths, "--json").output)
    hits = [p["tasks"]["broad"]["top"][0]["label"] == broad[r] for p, r in zip(predicted, rows)]
    assert metrics["broad"]["accuracy"] == pytest.approx(np.mean(hits))


def test_eval_manifest_groups_by_a_data_field_and_by_patient(eye, tmp_path):
    paths, data, rows = _test_images(eye, tmp_path / "images", 6)
    broad = data.dataset.labels["broad_label"]
    manifest = tmp_path / "manifest.csv"
    patients = ["a", "a", "b", "c", "c", "c"]
    lines = ["image,patient_id,broad_label,fine_label,diagnosis_text"]
    lines += [f"images/{p.name},{patients[i]},{broad[r]},," for i, (p, r) in enumerate(zip(paths, rows))]
    manifest.write_text("\n".join(lines) + "\n")
    checkpoint = eye / "stages" / "m1" / "model.safetensors"
    predicted = json.loads(invoke("predict", checkpoint, *paths, "--json").output)
    hits = [p["tasks"]["broad"]["top"][0]["label"] == broad[r] for p, r in zip(predicted, rows)]

    result = invoke("eval-manifest", checkpoint, manifest, "--group-by", "group", "--json", tmp_path / "g.json")
    assert result.exit_code == 0, result.output
    by_group = read_json(tmp_path / "g.json")["metrics"]["m1"]["by_group"]
    assert {g: m["broad"]["n"] for g, m in by_group.items()} == {"a": 2, "b": 1, "c": 3}
    assert by_group["c"]["broad"]["accuracy"] == pytest.approx(np.mean(hits[3:]))

    # a label field of the source (not a task name): groups are its raw values
    result = invoke("eval-manifest", checkpoint, manifest, "--group-by", "broad_label", "--json", tmp_path / "f.json")
    assert result.exit_code == 0, result.output
    by_value = read_json(tmp_path / "f.json")["metrics"]["m1"]["by_group"]
    values = [broad[r] for r in rows]
    assert {g: m["broad"]["n"] for g, m in by_value.items()} == {v: values.count(v) for v in set(values)}
    for value, metrics in by_value.items():
        mine = [h for h, v in zip(hits, values) if v == value]
        assert metrics["broad"]["accuracy"] == pytest.approx(np.mean(mine))
