"""Evaluation helpers beyond one pass: per-group metrics and the comparison table."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from distillkit.data import SplitData, iterate_batches
from distillkit.interfaces import Student, Task


@torch.no_grad()
def evaluate_grouped(model: Student, tasks: Mapping[str, Task], split: SplitData, group_task: str,
                     grouping: Task, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Every task's metrics restricted to the rows of each class of ``group_task``.

    Groups are the *true* labels of the grouping task (e.g. per broad disease), so each
    group's numbers answer "how well do we do on patients who have X".
    """
    model.eval()
    names = getattr(grouping, "classes", None)
    if names is None:
        raise ValueError(f"task '{group_task}' has no class list to group by")
    accumulators = {g: {t: task.metrics() for t, task in tasks.items()} for g in range(len(names))}
    for batch in iterate_batches(split, batch_size, device=device):
        assert batch.targets is not None
        feats = model.features(batch.inputs)
        predictions = {t: task.predict(model.heads[t], feats) for t, task in tasks.items()}
        group = batch.targets[group_task]
        for g in range(len(names)):
            rows = group["present"] & (group["y"] == g)
            if not bool(rows.any()):
                continue
            for t in tasks:
                accumulators[g][t].update({k: v[rows] for k, v in predictions[t].items()},
                                          {k: v[rows] for k, v in batch.targets[t].items()})
    return {names[g]: {t: acc.compute() for t, acc in accs.items()} for g, accs in accumulators.items()}


def headline_columns(tasks: Mapping[str, Task]) -> list[tuple[str, str, str]]:
    """(task, metric key, column title) for the summary table: primary metric, then top-k."""
    cols = []
    for name, task in tasks.items():
        cols.append((name, task.primary_metric, f"{name} {task.primary_metric}"))
        for k in getattr(task.params, "topk", []) or []:
            if k > 1:
                cols.append((name, f"top{k}", f"{name} top-{k}"))
    return cols


def summary_rows(metrics_by_model: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Task]) -> tuple[list[str], list[list[str]]]:
    cols = headline_columns(tasks)
    header = ["model"] + [c[2] for c in cols]
    rows = []
    for label, metrics in metrics_by_model.items():
        row = [label]
        for task, key, _ in cols:
            value = metrics.get(task, {}).get(key)
            row.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}")
        rows.append(row)
    return header, rows
