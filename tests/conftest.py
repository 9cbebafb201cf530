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
