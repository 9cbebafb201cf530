"""The data a config describes, re-created outside a run: for ``eval``, ``report`` and plugins.

A run directory does not store its data: ``distillkit eval`` and ``distillkit report``
re-create it from a config's ``data:`` and ``split:`` sections with the run's own split
logic (:func:`distillkit.data.split_indices`), so "the test split" means the same patients
as during the run. Only those two sections (and ``cache_dir``) are read, so the file may be
a full run config, a run directory's resolved ``config.yaml``, or a short data-only file::

    data: {kind: manifest, path: held_out.csv, image_size: 64}

Labels are encoded with the tasks of the *model* being evaluated (its class lists and
vocabulary travel in its checkpoint), never by fitting tasks on this data: a model trained
on one split must be scored with the class indices it was trained with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from distillkit.data import SPLITS, DataContext, Dataset, SplitData, SplitParams, split_indices
from distillkit.errors import DistillkitError
from distillkit.interfaces import Task
from distillkit.registry import Registries

#: the splits a spec can select: a run's four, plus every labeled item
SPLIT_CHOICES = (*SPLITS, "all")


@dataclass
class DataSpec:
    """A validated ``data:`` section with the split fractions and where paths resolve."""

    data: Any  # the dataset source's Params
    split: SplitParams
    base_dir: Path  # relative paths in ``data`` resolve here (the original config's folder)
    cache_dir: Path
    where: str  # the file the spec came from, for messages

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], registries: Registries, where: str, base_dir: Path,
                     lines: Mapping[str, int] | None = None) -> "DataSpec":
        """Validate the ``data``, ``split`` and ``cache_dir`` entries of a config mapping."""
        # The config validator reports nested dataset params with YAML paths and lines,
        # exactly as ``distillkit run`` would; the other sections are not ours to check.
        from distillkit.config import validate_data_sections

        if "data" not in raw:
            raise DistillkitError("the file has no 'data:' section (the dataset source, kind: ...).", where=where,
                                  hint="Give a run config, a run's config.yaml, or a file with only a data: section.")
        data, split, cache = validate_data_sections(raw, registries, where, lines)
        return cls(data, split, base_dir, _cache_dir(cache, base_dir), where)

    @classmethod
    def from_file(cls, path: str | Path, registries: Registries, overrides: Sequence[str] = (),
                  base_dir: Path | None = None) -> "DataSpec":
        """Read a YAML file (``--set`` overrides apply); relative paths resolve against
        ``base_dir`` (default: the file's folder)."""
        from distillkit.config import apply_overrides, read_yaml

        path = Path(path)
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise DistillkitError(f"{path} is not a YAML config (.yaml or .yml).", where="--data",
                                  hint="Give a run config, a run's config.yaml, or a file with only a data: section "
                                       "(e.g. 'data: {kind: ..., path: ...}').")
        raw, lines = read_yaml(path)
        raw = apply_overrides(raw, list(overrides)) if overrides else raw
        return cls.from_mapping(raw, registries, str(path), base_dir or path.resolve().parent, lines)

    def load(self, registries: Registries) -> "LoadedData":
        source_cls = registries.dataset.get(self.data.kind, where=f"{self.where}: data.kind")
        source = source_cls(self.data, DataContext(cache_dir=self.cache_dir, base_dir=self.base_dir, where="data"))
        fingerprint = source.fingerprint()
        return LoadedData(source.load(), self.split, fingerprint, self.where)


def _cache_dir(configured: str | None, base_dir: Path) -> Path:
    """The runner's rule: the config's ``cache_dir``, else ``$DISTILLKIT_CACHE``, else ~/.cache/distillkit."""
    path = Path(configured or os.environ.get("DISTILLKIT_CACHE", Path.home() / ".cache" / "distillkit"))
    return path if path.is_absolute() else base_dir / path


@dataclass
class LoadedData:
    dataset: Dataset
    split_params: SplitParams
    fingerprint: str
    where: str
    _encoded: dict[str, SplitData] = field(default_factory=dict, repr=False)

    def rows(self, split: str) -> np.ndarray:
        """Dataset indices of ``split`` (a run's train/val/test/unlabeled, or ``all`` labeled items)."""
        if split not in SPLIT_CHOICES:
            raise DistillkitError(f"unknown split '{split}'. Splits: {', '.join(SPLIT_CHOICES)}.", where="--split")
        if split == "all":
            rows = np.flatnonzero(~self.dataset.pool)
            if not len(rows):
                raise DistillkitError("the data has no labeled items to evaluate on.", where=self.where)
            return rows.astype(np.int64)
        return split_indices(self.dataset, self.split_params)[split]

    def split(self, split: str, tasks: Mapping[str, Task]) -> SplitData:
        """The rows of ``split`` with their labels encoded by ``tasks`` (already fitted).

        Models of one run share their tasks' state: their split is encoded once.
        """
        key = json.dumps([split, {n: [t.params.model_dump(mode="json"), t.state()] for n, t in tasks.items()}],
                         sort_keys=True, default=str)
        if key not in self._encoded:
            self._encoded[key] = self._encode(split, tasks)
        return self._encoded[key]

    def _encode(self, split: str, tasks: Mapping[str, Task]) -> SplitData:
        dataset = self.dataset
        missing = sorted({t.field for t in tasks.values() if t.field not in dataset.labels})
        if missing:
            raise DistillkitError(
                f"the model's tasks read label field(s) {', '.join(missing)}, which {dataset.source} does not "
                f"have (fields: {', '.join(sorted(dataset.labels)) or 'none'}).", where=self.where)
        rows = self.rows(split)
        inputs = dataset.inputs[torch.from_numpy(rows)] if len(rows) else dataset.inputs[:0]
        data = SplitData(split, rows, inputs.contiguous(), groups=[dataset.groups[i] for i in rows])
        if split != "unlabeled":
            data.raw_labels = {f: [values[i] for i in rows] for f, values in dataset.labels.items()}
            data.targets = {name: task.encode(data.raw_labels[task.field], where=f"{dataset.source} ({split} split)")
                            for name, task in tasks.items()}
        return data
