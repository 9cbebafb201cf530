"""Shared fixtures: a fresh plugin manager per test, small configs in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distillkit.plugins import PluginManager, set_plugin_manager

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def core_registries():
    """Registries with only the core's built-in components."""
    return PluginManager(autoload=False).registries


@pytest.fixture
def fresh_plugin_manager():
    """Installs a new process-wide plugin manager for the test and removes it afterwards."""
    set_plugin_manager(None)
    yield
    set_plugin_manager(None)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("DISTILLKIT_CACHE", str(path))
    return path


def toy_config(**overrides) -> dict:
    """A small, fast version of examples/toy.yaml as a dict."""
    config = yaml.safe_load((REPO / "examples" / "toy.yaml").read_text())
    config["data"].update(num_labeled=200, num_unlabeled=100)
    config["training"].update(epochs=3, batch_size=32)
    for key, value in overrides.items():
        config[key] = value
    return config


def write_config(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The suite's models are tiny: one intra-op thread is faster than two fighting over
    two cores, and it keeps the timing stable when the machine is shared."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def m3_weights_with_and_without_labels(config, registries, tmp_path: Path, stage: str = "m3"):
    """Run ``config``, then re-run only ``stage`` (and its teacher-output cache) in a copy whose
    labels and captions are all scrambled; return both runs' weights of ``stage``.

    A stage that reads no label gives bit-identical weights.
    """
    import shutil

    import torch

    from distillkit.checkpoint import load_model_state
    from distillkit.runner import Runner

    Runner(config, registries, tmp_path / "a").run()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "stages" / stage)
    shutil.rmtree(tmp_path / "b" / "cache", ignore_errors=True)
    scrambled = Runner(config, registries, tmp_path / "b")
    prepare = scrambled.prepare_data

    def prepare_scrambled():
        prepare()
        g = torch.Generator().manual_seed(7)
        for split in scrambled.splits.values():
            for target in (split.targets or {}).values():
                for value in target.values():
                    if value.dtype == torch.bool:
                        value.copy_(torch.rand(value.shape, generator=g) < 0.5)
                    else:
                        value.copy_(torch.randint(0, 4, value.shape, generator=g))

    scrambled.prepare_data = prepare_scrambled
    scrambled.run()
    a, _ = load_model_state(tmp_path / "a" / "stages" / stage / "model.safetensors")
    b, _ = load_model_state(tmp_path / "b" / "stages" / stage / "model.safetensors")
    return a, b
