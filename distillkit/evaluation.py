"""Evaluation helpers beyond one pass: per-group metrics and the comparison table."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from distillkit.data import SplitData, iterate_batches
from distillkit.errors import did_you_mean
from distillkit.interfaces import Student, Task

Tensor = torch.Tensor


#: ``group_by`` value that groups rows by their group id (e.g. the patient)
GROUP_ID = "group"


def grouping_problem(group_by: str, tasks: Mapping[str, Any], fields: Sequence[str] | None) -> str | None:
    """Why ``group_by`` cannot group rows, or ``None`` when it can.

    ``group_by`` names a classification task (rows grouped by their true class), a dataset
    field (by its raw value) or ``group`` (by group id). ``tasks`` maps task names to task
    classes or instances; ``fields`` is ``None`` while the data is not loaded yet (then only
    a task name can be refuted).
    """
    from distillkit.builtin.classification import ClassificationTask

    if group_by in tasks:
        task = tasks[group_by]
        cls = task if isinstance(task, type) else type(task)
        if issubclass(cls, ClassificationTask):
            return None
        return (f"task '{group_by}' is not a classification task, so its labels are not groups; group by a "
                f"classification task, a dataset field or '{GROUP_ID}' (the group id).")
    if fields is None or group_by == GROUP_ID or group_by in fields:
        return None
    choices = [t for t in tasks] + list(fields) + [GROUP_ID]
    return (f"'{group_by}' is neither a task, a field of the data nor '{GROUP_ID}'.{did_you_mean(group_by, choices)} "
            f"Fields: {', '.join(fields) or 'none'}.")


def row_groups(split: SplitData, group_by: str, tasks: Mapping[str, Task]) -> tuple[list[str], Tensor]:
    """The group names and each row's group (an index into them; -1: the row has no group).

    A classification task groups by the true class (rows without a known label have none);
    a field by its raw value, sorted; ``group`` by the group id.
    """
    if group_by in tasks:
        target = split.targets[group_by]
        return list(tasks[group_by].classes), torch.where(target["present"], target["y"], -1).cpu()
    values = split.groups if group_by == GROUP_ID and group_by not in split.raw_labels else split.raw_labels[group_by]
    names = sorted({str(v) for v in values if v is not None})
    index = {name: i for i, name in enumerate(names)}
    return names, torch.tensor([index[str(v)] if v is not None else -1 for v in values], dtype=torch.long)


@torch.no_grad()
def evaluate_grouped(model: Student, tasks: Mapping[str, Task], split: SplitData, group_by: str,
                     grouping: Mapping[str, Task], batch_size: int, device: torch.device) -> dict[str, Any]:
    """Every task's metrics restricted to the rows of each group (see :func:`row_groups`).

    ``grouping`` holds the tasks ``group_by`` may name. A task's groups are its *true* labels
    (e.g. per broad disease), so each group's numbers answer "how well do we do on patients who
    have X".
    """
    model.eval()
    names, groups = row_groups(split, group_by, grouping)
    accumulators = {g: {t: task.metrics() for t, task in tasks.items()} for g in range(len(names))}
    for batch in iterate_batches(split, batch_size, device=device):
        assert batch.targets is not None
        feats = model.features(batch.inputs)
        predictions = {t: task.predict(model.heads[t], feats) for t, task in tasks.items()}
        group = groups[batch.index].to(device)
        for g in range(len(names)):
            rows = group == g
            if not bool(rows.any()):
                continue
            for t in tasks:
                accumulators[g][t].update({k: v[rows] for k, v in predictions[t].items()},
                                          {k: v[rows] for k, v in batch.targets[t].items()})
    return {names[g]: {t: acc.compute() for t, acc in accs.items()} for g, accs in accumulators.items()}


def headline_columns(tasks: Mapping[str, Task]) -> list[tuple[str, str, str]]:
    """(task, metric key, column title) for the summary table: primary metric, then top-k.

    Classification tasks add balanced accuracy, the majority-class rate and macro AUC beside
    accuracy, so an accuracy that merely equals the majority rate shows at a glance.
    """
    cols = []
    for name, task in tasks.items():
        cols.append((name, task.primary_metric, f"{name} {task.primary_metric}"))
        if hasattr(task.params, "screening_specificity"):
            cols += [(name, "balanced_accuracy", f"{name} bal. acc"), (name, "majority_rate", f"{name} majority"),
                     (name, "macro_auc", f"{name} AUC")]
        for k in getattr(task.params, "topk", []) or []:
            if k > 1:
                cols.append((name, f"top{k}", f"{name} top-{k}"))
    return cols


def summary_rows(metrics_by_model: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Task]) -> tuple[list[str], list[list[str]]]:
    cols = headline_columns(tasks)
    # labels training never saw, scored as wrong: a column only when some model met them
    for name in tasks:
        if any((m.get(name) or {}).get("unseen") for m in metrics_by_model.values()):
            cols.append((name, "unseen", f"{name} unseen"))
    header = ["model"] + [c[2] for c in cols]
    rows = []
    for label, metrics in metrics_by_model.items():
        row = [label]
        for task, key, _ in cols:
            value = metrics.get(task, {}).get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                row.append("-")
            else:
                row.append(str(value) if isinstance(value, int) else f"{value:.3f}")
        rows.append(row)
    return header, rows


def evaluate_checkpoints(models: Sequence[tuple[str, Any]], data: Any, split: str, registries: Any,
                         device: torch.device, batch_size: int = 256,
                         group_by: str | None = None) -> tuple[dict[str, Any], dict[str, Task]]:
    """Metrics of model files on one split of re-created data (``distillkit eval``).

    ``models`` is ``(label, path)`` pairs and ``data`` a :class:`distillkit.data_spec.LoadedData`.
    Each model's labels are encoded with its *own* tasks (class lists and vocabulary from its
    checkpoint), so the numbers equal those of the run's evaluate stage on the same split.
    Returns ``{label: metrics}`` and every task seen (for :func:`summary_rows`).
    """
    from distillkit.errors import DistillkitError
    from distillkit.models import load_model
    from distillkit.training import evaluate

    if split == "unlabeled":
        raise DistillkitError("the unlabeled split has no labels to evaluate against.", where="--split")
    results: dict[str, Any] = {}
    all_tasks: dict[str, Task] = {}
    for label, path in models:
        loaded = load_model(path, registries, device)
        rows = data.split(split, loaded.tasks)
        if not len(rows):
            raise DistillkitError(f"the {split} split is empty.", where=data.where)
        metrics = evaluate(loaded.model, loaded.tasks, rows, batch_size, device)
        if group_by:
            problem = grouping_problem(group_by, loaded.tasks, sorted(data.dataset.labels))
            if problem:
                raise DistillkitError(f"model {label}: {problem}", where="--group-by")
            metrics["by_group"] = evaluate_grouped(loaded.model, loaded.tasks, rows, group_by,
                                                   loaded.tasks, batch_size, device)
        results[label] = metrics
        for name, task in loaded.tasks.items():
            all_tasks.setdefault(name, task)
    return results, all_tasks
