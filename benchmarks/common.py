"""Shared set-up for the benchmarks: synthetic fundus data, fitted tasks, students and teachers."""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distillkit.config import validate_config
from distillkit.data import DataContext, prepare_splits
from distillkit.interfaces import Teacher
from distillkit.models import build_student
from distillkit.plugins import PluginManager

TASKS = {
    "broad": {"kind": "classification", "field": "broad_label", "hidden": 128},
    "fine": {"kind": "classification", "field": "fine_label", "hidden": 128, "topk": [1, 5]},
    "text": {"kind": "caption", "field": "diagnosis_text", "embedding_dim": 128, "hidden_dim": 256},
}


def eye_setup(num_patients: int = 300, image_size: int = 64, encoder: dict | None = None):
    """(registries, config, tasks, splits) for a small synthetic fundus data set."""
    registries = PluginManager().registries
    raw = {
        "data": {"kind": "synthetic_fundus", "num_patients": num_patients, "num_unlabeled": 0,
                 "image_size": image_size},
        "split": {"val": 0.1, "test": 0.1, "train_fraction": 0.8},
        "tasks": TASKS,
        "student": {"kind": "multitask", "encoder": encoder or {"kind": "small_cnn"}},
        "stages": {"m1": {"kind": "train"}},
    }
    config = validate_config(raw, registries)
    cache = Path(tempfile.gettempdir()) / "distillkit-bench-cache"
    source = registries.dataset.get("synthetic_fundus")(config.data, DataContext(cache, Path(".")))
    dataset = source.load()
    tasks = {name: registries.task.get(p.kind)(name, p) for name, p in config.tasks.items()}
    splits = prepare_splits(dataset, config.split, tasks)
    return registries, config, tasks, splits


def seven_teachers(registries, config, tasks) -> list[Teacher]:
    """One (untrained) teacher per non-empty subset of the tasks: the paper's ensemble.

    Untrained teachers cost the same to run as trained ones; their captions run to the
    maximum length, the worst case for decoding.
    """
    names = list(tasks)
    teachers = []
    for r in range(1, len(names) + 1):
        for subset in itertools.combinations(names, r):
            torch.manual_seed(len(teachers))
            model = build_student(config.student, {t: tasks[t] for t in subset}, registries)
            teachers.append(Teacher(name="+".join(subset), model=model, tasks=frozenset(subset),
                                    checksum=f"bench{len(teachers)}"))
    return teachers


class StepTimer:
    """fit() callbacks recording each training step; the first step (warm-up) is dropped."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_epoch_start(self, epoch, total, steps):
        self.stamps = [time.perf_counter()]

    def on_step(self):
        self.stamps.append(time.perf_counter())

    def on_epoch_end(self, epoch, record):
        pass

    def per_step(self) -> float:
        return statistics.median(b - a for a, b in zip(self.stamps[1:], self.stamps[2:]))

    def epoch(self) -> float:
        return self.stamps[-1] - self.stamps[0]
