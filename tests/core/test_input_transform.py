"""An input transform fitted on the training split travels in the model file; ``predict`` reads
raw files through the dataset source and gives what evaluation gives on the same rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distillkit.checkpoint import load_model_state
from distillkit.cli import cli
from distillkit.data import DataContext, Dataset, DatasetSource, split_indices
from distillkit.errors import DistillkitError
from distillkit.interfaces import Params
from distillkit.models import load_model
from distillkit.plugins import PluginManager
from distillkit.rundir import RunDirectory
from tests.conftest import toy_config, write_config


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch, fresh_plugin_manager, cache_dir):
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture
def standardized_run(tmp_path):
    """Raw inputs around 50 (the MLP would barely train on them), standardised by the run."""
    config = toy_config()
    config["data"].update(offset=50.0, standardize=True)
    config["training"].update(epochs=3)
    config["stages"] = {"m1": {"kind": "train"}, "report": {"kind": "evaluate", "models": ["m1"]}}
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(write_config(tmp_path, config)), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _data(run):
    registries = PluginManager(autoload=False).registries
    data = RunDirectory(run).load_data(registries)
    return registries, data, split_indices(data.dataset, data.split_params)


def test_the_transform_is_fitted_on_the_training_split_and_saved(standardized_run):
    _, data, idx = _data(standardized_run)
    train = data.dataset.inputs[torch.as_tensor(idx["train"])].double().numpy()
    state, _ = load_model_state(standardized_run / "stages" / "m1" / "model.safetensors")
    assert float(data.dataset.inputs.mean()) > 45  # the raw inputs are not centred
    np.testing.assert_allclose(state["encoder.input_transform.shift"].numpy(), train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(state["encoder.input_transform.scale"].numpy(), train.std(0), rtol=1e-5)
    # not the statistics of all labeled rows: validation and test do not enter
    labeled = data.dataset.inputs[torch.as_tensor(np.concatenate([idx["train"], idx["val"], idx["test"]]))]
    assert not np.allclose(state["encoder.input_transform.shift"].numpy(), labeled.double().mean(0).numpy(),
                           rtol=1e-6, atol=0)


def test_predict_on_raw_files_equals_evaluation_on_the_same_rows(standardized_run, tmp_path):
    registries, data, idx = _data(standardized_run)
    rows = idx["test"]
    files = []
    for i, row in enumerate(rows):
        path = tmp_path / "points" / f"p{i:03d}.csv"
        path.parent.mkdir(exist_ok=True)
        path.write_text(",".join(repr(float(v)) for v in data.dataset.inputs[row].tolist()) + "\n")
        files.append(path)
    checkpoint = standardized_run / "stages" / "m1" / "model.safetensors"
    result = CliRunner().invoke(cli, ["predict", str(checkpoint), str(tmp_path / "points"), "--json"])
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.output)
    assert [p["file"] for p in predicted] == [str(f) for f in files]

    # by hand: standardise with the training split's statistics, then the model without its transform
    loaded = load_model(checkpoint, registries)
    train = data.dataset.inputs[torch.as_tensor(idx["train"])].double()
    x = (data.dataset.inputs[torch.as_tensor(rows)].double() - train.mean(0)) / train.std(0, unbiased=False)
    del loaded.model.encoder.input_transform
    with torch.no_grad():
        probs = torch.softmax(loaded.model.heads["cluster"](loaded.model.features(x.float())), -1)
    classes = loaded.tasks["cluster"].classes
    got = torch.tensor([[p["tasks"]["cluster"]["probabilities"][c] for c in classes] for p in predicted])
    assert torch.allclose(got, probs, atol=1e-5)

    # and the evaluate stage's accuracy on the test split is predict's on the same rows
    truth = [data.dataset.labels["cluster"][r] for r in rows]
    hits = [p["tasks"]["cluster"]["top"][0]["label"] == t for p, t in zip(predicted, truth)]
    metrics = json.loads((standardized_run / "metrics.json").read_text())["report"]["test"]["m1"]
    assert metrics["cluster"]["accuracy"] == pytest.approx(np.mean(hits))
    assert np.mean(hits) > 0.5  # 4 clusters; unstandardised, the same 3 epochs reach about 0.37

    # distillkit eval re-creates the data and applies the model's own transform: the same numbers
    evaluated = CliRunner().invoke(cli, ["eval", str(checkpoint), "--split", "test", "--json", "-"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output[evaluated.output.index("{"):])
    assert next(iter(report["metrics"].values()))["cluster"]["accuracy"] == pytest.approx(np.mean(hits))


def test_a_source_without_load_inputs_cannot_predict():
    class _Params(Params):
        kind: str = "fixed"

    class _Fixed(DatasetSource):
        Params = _Params

        def load(self) -> Dataset:
            raise AssertionError("not called")

    source = _Fixed(_Params(), DataContext(cache_dir=".", base_dir=".", where="data"))
    with pytest.raises(DistillkitError, match="dataset source 'fixed' cannot read inputs from files"):
        source.load_inputs([])
    assert source.fit_input_transform(torch.zeros(3, 2)) is None
