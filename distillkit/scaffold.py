"""``distillkit new-plugin NAME``: a plugin package to start from.

The package is small but real: a dataset source reading rows of numbers from a CSV file
(whose default fingerprint covers the file's bytes), a classification task written against the public
API, a CSV of generated rows, a config that runs teacher -> student -> evaluation in
seconds, and tests. ``pip install -e`` installs it, ``distillkit plugins`` lists it, and its
tests pass as written.
"""

from __future__ import annotations

import keyword
import random
import re
from pathlib import Path

from distillkit.errors import DistillkitError

#: the generated CSV: labeled rows, unlabeled rows (empty label), classes and their centres
LABELED_ROWS = 120
UNLABELED_ROWS = 40
CLASSES = {"alpha": (2.0, 0.0, 0.0), "beta": (0.0, 2.0, 0.0), "gamma": (0.0, 0.0, 2.0)}


def package_name(name: str) -> str:
    """The Python package of a plugin called ``name`` (``house-prices`` -> ``house_prices``)."""
    package = name.strip().replace("-", "_").lower()
    if not re.fullmatch(r"[a-z][a-z0-9_]*", package) or keyword.iskeyword(package):
        raise DistillkitError(f"'{name}' is not a valid plugin name: use letters, digits, '-' and '_', starting with "
                              "a letter (e.g. house-prices).", where="NAME")
    if package in ("distillkit", "eye_fundus", "test", "tests"):
        raise DistillkitError(f"'{name}' is taken; choose another plugin name.", where="NAME")
    return package


def write_plugin(name: str, parent: Path) -> Path:
    """Write the plugin package ``name`` into ``parent/<name>`` and return that folder."""
    package = package_name(name)
    dist = package.replace("_", "-")
    root = Path(parent) / dist
    if root.exists():
        raise DistillkitError(f"{root} already exists; choose another NAME or --dir.", where=str(root))
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{package}/__init__.py": INIT,
        f"{package}/plugin.py": PLUGIN,
        f"{package}/data.py": DATA,
        f"{package}/task.py": TASK,
        "tests/test_plugin.py": TESTS,
        "config.yaml": CONFIG,
        "data.csv": generated_csv(),
    }
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("__PKG__", package).replace("__DIST__", dist), encoding="utf-8")
    return root


def generated_csv(seed: int = 0) -> str:
    """Points around one centre per class in three dimensions; pairs of rows share a group."""
    rng = random.Random(seed)
    names = list(CLASSES)
    lines = ["id,group,x1,x2,x3,label"]
    for i in range(LABELED_ROWS + UNLABELED_ROWS):
        label = names[i % len(names)]
        x = [c + rng.gauss(0.0, 0.7) for c in CLASSES[label]]
        shown = label if i < LABELED_ROWS else ""  # the last rows form the unlabeled pool
        lines.append(f"r{i},g{i // 2},{x[0]:.3f},{x[1]:.3f},{x[2]:.3f},{shown}")
    return "\n".join(lines) + "\n"


PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "A distillkit plugin: a CSV dataset source and a classification task."
requires-python = ">=3.10"
dependencies = ["distillkit"]

# distillkit finds the plugin through this entry point: `distillkit plugins` lists it.
[project.entry-points.distillkit]
__PKG__ = "__PKG__.plugin"

[tool.setuptools]
packages = ["__PKG__"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''\
# __DIST__

A distillkit plugin. It registers

* a dataset source, `kind: __PKG___csv` (`__PKG__/data.py`): rows of numbers and a label from a
  CSV file; an empty label puts the row in the unlabeled pool;
* a task, `kind: __PKG___label` (`__PKG__/task.py`): classification over the labels of the
  training split, with its cross-entropy, its distillation loss and its accuracy.

```
pip install -e .
distillkit plugins                    # lists __PKG__ and its components
pytest                                # the plugin's tests
distillkit run config.yaml --out runs/__PKG__
```

`config.yaml` trains a teacher on `data.csv`, distills it into a student on the unlabeled rows
and compares both on the test split. `distillkit config-doc` lists every key a config can set,
this plugin's included. The plugin imports only `from distillkit import ...`: the core's public API.
'''

INIT = '''\
"""__DIST__: a distillkit plugin."""

__version__ = "0.1.0"
'''

PLUGIN = '''\
"""Registers __PKG__'s components with distillkit (found through the `distillkit` entry point)."""

from distillkit import hookimpl


@hookimpl
def register_datasets(register):
    from __PKG__.data import CsvRows  # imported inside the hook: loading plugins stays cheap

    register("__PKG___csv", CsvRows)


@hookimpl
def register_tasks(register):
    from __PKG__.task import LabelTask

    register("__PKG___label", LabelTask)
'''

DATA = '''\
"""A dataset source: rows of numbers and one label per row, read from a CSV file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from distillkit import Dataset, DatasetSource, DistillkitError, Params


class CsvRowsParams(Params):
    # ``str``, not ``Literal``: a subclass registered under another name keeps working
    kind: str = "__PKG___csv"
    path: str = Field(description="the CSV file; a relative path resolves against the config's folder")
    features: list[str] = Field(default_factory=lambda: ["x1", "x2", "x3"], min_length=1,
                                description="the columns that form a row's input (numbers)")
    label: str = Field("label", description="the label column (the dataset field of that name); an empty cell "
                                            "puts the row in the unlabeled pool")
    group: str = Field("group", description="rows of one group (e.g. one patient) never go to different splits")


class CsvRows(DatasetSource):
    """Rows of a CSV file: the feature columns as one float input row, and one label field.

    The default ``fingerprint()`` covers the params and the bytes of the file ``path`` names,
    so an edited cell re-runs the stages; a source reading files its params do not name
    overrides ``data_files()``.
    """

    Params = CsvRowsParams

    @property
    def path(self) -> Path:
        path = Path(self.params.path)
        return path if path.is_absolute() else self.context.base_dir / path

    def load(self) -> Dataset:
        p = self.params
        if not self.path.is_file():
            raise DistillkitError(f"the CSV file {self.path} does not exist.", where=f"{self.context.where}.path")
        with open(self.path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            raise DistillkitError("the CSV file has no rows.", where=str(self.path))
        missing = [c for c in (*p.features, p.label, p.group) if c not in rows[0]]
        if missing:
            raise DistillkitError(f"no column {', '.join(missing)} (columns: {', '.join(rows[0])}).",
                                  where=str(self.path))
        x = np.zeros((len(rows), len(p.features)), dtype=np.float32)
        for i, row in enumerate(rows):
            try:
                x[i] = [float(row[c]) for c in p.features]
            except (TypeError, ValueError):
                raise DistillkitError(f"line {i + 2}: the columns {', '.join(p.features)} must hold numbers.",
                                      where=str(self.path)) from None
        labels = [(row[p.label] or "").strip() or None for row in rows]
        return Dataset(inputs=torch.from_numpy(x), labels={p.label: labels}, groups=[row[p.group] for row in rows],
                       ids=[f"{self.path.name}:{i + 2}" for i in range(len(rows))],
                       pool=np.array([v is None for v in labels]), source=str(self.path))

'''

TASK = '''\
"""A classification task: linear head, cross-entropy to the labels, tempered KL to the teachers."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillkit import DistillkitError, MetricAccumulator, Params, Task, kl_rows, tempered_probs

Tensor = torch.Tensor


class LabelParams(Params):
    kind: str = "__PKG___label"
    field: str | None = Field(None, description="the dataset label field (default: the task's name)")
    weight: float = Field(1.0, ge=0, description="the task's weight in the summed loss")


class LabelTask(Task):
    """Classification over the labels seen in the training split."""

    Params = LabelParams
    primary_metric = "accuracy"

    def __init__(self, name: str, params: LabelParams):
        super().__init__(name, params)
        self.classes: list[str] = []

    # labels: the class list comes from the training split only
    def fit(self, labels: Sequence[str | None]) -> None:
        self.classes = sorted({v for v in labels if v is not None})

    def encode(self, labels: Sequence[str | None], where: str = "") -> dict[str, Tensor]:
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({v for v in labels if v is not None and v not in index})
        if unknown:
            raise DistillkitError(f"task '{self.name}': label '{unknown[0]}' is not in the training class list "
                                  f"({', '.join(self.classes)}).", where=where or None)
        return {"y": torch.tensor([index[v] if v is not None else 0 for v in labels], dtype=torch.long),
                "present": torch.tensor([v is not None for v in labels], dtype=torch.bool)}

    def state(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}  # travels with every checkpoint

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.classes = list(state["classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    # model
    def build_head(self, in_features: int) -> nn.Module:
        return nn.Linear(in_features, len(self.classes))

    def forward(self, head: nn.Module, features: Tensor, guide=None, train: bool = False) -> Tensor:
        return head(features)

    def predict(self, head: nn.Module, features: Tensor) -> dict[str, Tensor]:
        return {"probs": F.softmax(head(features).float(), dim=-1)}

    # losses, per row
    def hard_loss(self, logits: Tensor, target: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits.float(), target["y"], reduction="none") * target["present"]

    def soft_loss(self, logits: Tensor, soft: Mapping[str, Tensor], tau: float) -> Tensor:
        return kl_rows(logits, soft["probs"], tau)

    def soft_target(self, heads, features, weights, target, tau) -> dict[str, Tensor]:
        # The weighted mean of the teachers' tempered distributions: distilling to it equals
        # distilling from each teacher with that weight (up to a constant).
        return {"probs": sum(w * tempered_probs(head(f), tau) for head, f, w in zip(heads, features, weights))}

    # evaluation
    def metrics(self) -> MetricAccumulator:
        return Accuracy()

    def describe(self) -> str:
        return f"classification of '{self.field}' over {len(self.classes)} classes"


class Accuracy(MetricAccumulator):
    """The fraction of labeled rows whose most probable class is the label, over a whole split."""

    def __init__(self) -> None:
        self.correct = torch.zeros(())
        self.count = torch.zeros(())

    def update(self, prediction: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
        present = target["present"]
        hits = (prediction["probs"].argmax(-1) == target["y"]) & present
        # summed on the device; read once in compute()
        self.correct = self.correct.to(hits.device) + hits.sum()
        self.count = self.count.to(hits.device) + present.sum()

    def compute(self) -> dict[str, Any]:
        n = int(self.count)
        return {"n": n, "accuracy": float(self.correct) / n if n else float("nan")}
'''

CONFIG = '''\
# distillkit run config.yaml --out runs/__PKG__
# A teacher learns the labeled rows of data.csv, a student learns from the teacher on the
# unlabeled rows, and both are compared on the test split. `distillkit config-doc` lists every key.
name: __PKG__
seed: 0
device: cpu
data: {kind: __PKG___csv, path: data.csv}
split: {val: 0.2, test: 0.2, train_fraction: 0.6}
tasks:
  label: {kind: __PKG___label}
student:
  kind: multitask
  encoder: {kind: mlp, in_features: 3, hidden: 16, depth: 1}
training:
  optimizer: {kind: adam, lr: 0.03, weight_decay: 0.0}
  batch_size: 16
  epochs: 15
  early_stopping: null
stages:
  teacher: {kind: train}
  student: {kind: distill, teachers: [teacher], data: unlabeled, temperature: 2.0}
  report: {kind: evaluate, models: [teacher, student]}
'''

TESTS = '''\
"""Tests of __PKG__; run `pytest` after `pip install -e .` (the last one runs the config)."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import __PKG__.plugin
from distillkit import DataContext, PluginManager, load_config, read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registries():
    # only the core and this plugin, whatever else is installed
    return PluginManager(autoload=False, plugins=[__PKG__.plugin]).registries


def _source(registries, folder: Path, cache: Path):
    source_cls = registries.dataset.get("__PKG___csv")
    return source_cls(source_cls.Params(path="data.csv"), DataContext(cache_dir=cache, base_dir=folder))


def test_the_components_are_registered(registries):
    assert "__PKG___csv" in registries.dataset and "__PKG___label" in registries.task


def test_the_source_reads_every_row_of_the_csv(registries, tmp_path):
    data = _source(registries, ROOT, tmp_path).load()
    with open(ROOT / "data.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(data) == len(rows)
    for i in (0, len(rows) - 1):
        assert data.inputs[i].tolist() == pytest.approx([float(rows[i][c]) for c in ("x1", "x2", "x3")])
        assert data.labels["label"][i] == (rows[i]["label"] or None)
        assert data.groups[i] == rows[i]["group"]
    assert int(data.pool.sum()) == sum(1 for r in rows if not r["label"])


def test_the_fingerprint_follows_the_files_contents(registries, tmp_path):
    shutil.copy(ROOT / "data.csv", tmp_path / "data.csv")
    before = _source(registries, tmp_path, tmp_path).fingerprint()
    text = (tmp_path / "data.csv").read_text()
    (tmp_path / "data.csv").write_text(text.replace(",alpha", ",beta", 1))  # one edited cell
    assert _source(registries, tmp_path, tmp_path).fingerprint() != before


def test_the_task_losses_have_their_textbook_values(registries):
    task_cls = registries.task.get("__PKG___label")
    task = task_cls("label", task_cls.Params())
    task.fit(["b", "a", None, "c"])
    assert task.class_names == ["a", "b", "c"]
    target = task.encode(["c", None])
    # uniform logits: cross-entropy log(3) on the labeled row, 0 on the row without a label
    assert task.hard_loss(torch.zeros(2, 3), target).tolist() == pytest.approx([math.log(3), 0.0])
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    same = task.soft_target([torch.nn.Identity()], [logits], [1.0], None, tau=2.0)
    e = [math.exp(v / 2.0) for v in (1.0, 2.0, 3.0)]  # softmax at temperature 2, by hand
    assert same["probs"][0].tolist() == pytest.approx([v / sum(e) for v in e])
    assert task.soft_loss(logits, same, 2.0).tolist() == pytest.approx([0.0], abs=1e-6)  # KL(p || p) = 0


def test_the_config_validates(registries):
    config = load_config(ROOT / "config.yaml", registries)
    assert config.data.kind == "__PKG___csv" and list(config.tasks) == ["label"]


def test_the_config_runs_end_to_end(tmp_path):
    # `distillkit run` finds the plugin through its entry point: this needs `pip install -e .`
    env = {**os.environ, "DISTILLKIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "distillkit", "run", str(ROOT / "config.yaml"),
                             "--out", str(tmp_path / "run"), "--quiet"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    test = read_json(tmp_path / "run" / "metrics.json")["report"]["test"]
    assert set(test) == {"teacher", "student"}
    # three well-separated classes: far better than the 1/3 of guessing
    assert test["teacher"]["label"]["accuracy"] > 0.8
'''
