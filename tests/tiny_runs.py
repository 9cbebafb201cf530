"""Tiny finished runs for tests of the commands that read a run directory (eval, predict, report)."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from distillkit.cli import cli
from distillkit.plugins import set_plugin_manager
from tests.conftest import toy_config, write_config


def tiny_eye_config() -> dict:
    """The paper's M1 -> M3 pipeline on 24 synthetic patients of 32 px, one epoch per stage."""
    caption = {"kind": "caption", "field": "diagnosis_text", "vocab_size": 60, "max_length": 10,
               "embedding_dim": 16, "hidden_dim": 32}
    return {
        "name": "tiny_eye",
        "seed": 0,
        "device": "cpu",
        "data": {"kind": "synthetic_fundus", "num_patients": 24, "num_unlabeled": 16, "image_size": 32,
                 "num_fine_classes": 12},
        "tasks": {"broad": {"kind": "classification", "field": "broad_label", "hidden": 16},
                  "fine": {"kind": "classification", "field": "fine_label", "hidden": 16, "topk": [1, 5]},
                  "text": caption},
        "student": {"kind": "multitask", "encoder": {"kind": "small_cnn", "width": 8, "depth": 3}},
        "training": {"optimizer": {"kind": "adam", "lr": 0.003}, "batch_size": 16, "epochs": 1,
                     "early_stopping": None},
        "stages": {"m1": {"kind": "train", "training": {"epochs": 2}},
                   "m3": {"kind": "distill", "init": "m1", "teachers": ["m1"], "data": "unlabeled",
                          "teacher_outputs": {"mode": "online"}},
                   "report": {"kind": "evaluate", "models": ["m1", "m3"], "group_by": "broad"}},
    }


def tiny_toy_config() -> dict:
    return toy_config(training={"optimizer": {"kind": "adam", "lr": 0.01}, "batch_size": 32, "epochs": 2,
                                "early_stopping": None})


def make_run(config: dict, folder: Path) -> Path:
    """Write ``config`` to ``folder/config.yaml``, run it into ``folder/run`` and return that."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder, config)
    out = folder / "run"
    set_plugin_manager(None)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


class Environment:
    """Module-scoped environment variables (pytest's monkeypatch is function-scoped)."""

    def __init__(self, **values: str | None):
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> "Environment":
        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return self

    def __exit__(self, *exc) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        set_plugin_manager(None)
