"""Evaluating trained models outside a run: per-group metrics, the comparison table, and
:func:`evaluate_models` / :func:`run_eval`, the body of ``distillkit eval`` (public API: a
plugin command that names its data another way calls them too)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from distillkit.data import SplitData, iterate_batches
from distillkit.errors import did_you_mean
from distillkit.interfaces import Student, Task

Tensor = torch.Tensor


#: ``group_by`` value that groups rows by their group id (e.g. the patient)
GROUP_ID = "group"


def grouping_problem(group_by: str, tasks: Mapping[str, Any], fields: Sequence[str] | None) -> str | None:
    """Why ``group_by`` cannot group rows, or ``None`` when it can.

    ``group_by`` names a task with classes (``Task.class_names``, e.g. a classification task:
    rows grouped by their true class), a dataset field (by its raw value) or ``group`` (by
    group id). ``tasks`` maps task names to task classes or instances; ``fields`` is ``None``
    while the data is not loaded yet (then only a task name can be refuted).
    """
    if group_by in tasks:
        task = tasks[group_by]
        # A task has classes when it overrides Task.class_names (a class, before the data is
        # loaded) or returns a list (an instance, fitted on the training split).
        has_classes = (task.class_names is not Task.class_names if isinstance(task, type)
                       else task.class_names is not None)
        if has_classes:
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
        return list(tasks[group_by].class_names), torch.where(target["present"], target["y"], -1).cpu()
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
    from distillkit import distributed
    from distillkit.training import split_outputs

    model.eval()
    names, groups = row_groups(split, group_by, grouping)
    accumulators = {g: {t: task.metrics() for t, task in tasks.items()} for g in range(len(names))}

    def predictions_of(batch):
        feats = model.features(batch.inputs)
        return {t: task.predict(model.heads[t], feats) for t, task in tasks.items()}

    # under torchrun the ranks share the batches and rank 0 accumulates them all, in order
    for batch, predictions in split_outputs(split, batch_size, device, None, predictions_of):
        assert batch.targets is not None
        group = groups[batch.index].to(device)
        for g in range(len(names)):
            rows = group == g
            if not bool(rows.any()):
                continue
            for t in tasks:
                accumulators[g][t].update({k: v[rows] for k, v in predictions[t].items()},
                                          {k: v[rows] for k, v in batch.targets[t].items()})
    result = ({names[g]: {t: acc.compute() for t, acc in accs.items()} for g, accs in accumulators.items()}
              if distributed.is_main() else None)
    return distributed.broadcast_object(result)


def headline_columns(tasks: Mapping[str, Task]) -> list[tuple[str, str, str]]:
    """(task, metric key, column title) for the summary table: each task's
    :meth:`~distillkit.interfaces.Task.headline_metrics` (primary metric, then top-k)."""
    return [(name, key, f"{name} {title}") for name, task in tasks.items() for key, title in task.headline_metrics()]


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


@dataclass
class EvalReport:
    """What :func:`evaluate_models` measured: ``metrics`` is ``{model label: {task: metrics}}``."""

    split: str
    data: str  # where the data came from (a config file, a manifest)
    data_fingerprint: str
    items: int  # rows of the split
    models: dict[str, str]  # label -> model file
    metrics: dict[str, Any]
    tasks: dict[str, Task] = field(default_factory=dict, repr=False)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The summary table's header and rows (one row per model), as :func:`summary_rows`."""
        return summary_rows(self.metrics, self.tasks)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "data": self.data, "data_fingerprint": self.data_fingerprint,
                "models": dict(self.models), "metrics": self.metrics}


def evaluate_models(model: str | Path, spec: Any = None, split: str = "test", *, stages: Sequence[str] = (),
                    group_by: str | None = None, batch_size: int = 256, device: str = "auto",
                    warn: Callable[[str], None] | None = None) -> EvalReport:
    """Metrics of a model file, or of a run directory's models, on one split of some data.

    :param model: a model ``.safetensors`` file or a run directory (its evaluate stages'
        models, or every model; ``stages`` selects stages by name).
    :param spec: a :class:`distillkit.data_spec.DataSpec`, or ``None`` for the data of the
        run the model belongs to.
    :param split: ``train``, ``val``, ``test`` (the run's patient-level split) or ``all``.
    :param group_by: also compute every metric per group (``by_group``): per true class of a
        classification task, per value of a data field, or per group id (``group``).
    :param device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    :param warn: receives notes about the data (e.g. a changed fingerprint); default: stderr.
    """
    from distillkit.errors import DistillkitError
    from distillkit.plugins import get_plugin_manager
    from distillkit.rundir import RunDirectory, find_run_dir
    from distillkit.runner import resolve_device

    registries = get_plugin_manager().registries
    model = Path(model)
    if model.is_dir():
        run = RunDirectory(model)
        models = [(m.label, m.path) for m in run.models(stages)]
    else:
        if stages:
            raise DistillkitError("--stage applies to a run directory, not to a single model file.", where="--stage")
        run = find_run_dir(model)
        models = [(model.parent.name if model.stem == "model" else model.stem, model)]
    if spec is not None:
        data = spec.load(registries)
    elif run is not None:
        data = run.load_data(registries, warn=warn)
    else:
        raise DistillkitError(f"{model} is not inside a run directory, so its data is unknown; give --data "
                              "(a config, or a YAML file with a data: section).", where="--data")
    results, tasks = evaluate_checkpoints(models, data, split, registries, resolve_device(device), batch_size,
                                          group_by)
    return EvalReport(split, data.where, data.fingerprint, len(data.rows(split)),
                      {label: str(path) for label, path in models}, results, tasks)


def run_eval(model: str | Path, spec: Any = None, split: str = "test", *, stages: Sequence[str] = (),
             group_by: str | None = None, json_out: str | Path | None = None, batch_size: int = 256,
             device: str = "auto") -> dict[str, Any]:
    """:func:`evaluate_models`, then what ``distillkit eval`` shows: the table (on stderr when
    the JSON goes to stdout), a note per model with labels training never saw, and the JSON
    (``json_out``: a file, or ``-`` for stdout). Returns the JSON's content."""
    import json

    import click
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from distillkit.io import _jsonable, write_json

    report = evaluate_models(model, spec, split, stages=stages, group_by=group_by, batch_size=batch_size,
                             device=device, warn=lambda m: click.echo(m, err=True))
    header, rows = report.table()
    to_stdout = json_out is not None and str(json_out) == "-"
    table = Table(title=escape(f"{split} split of {report.data} ({report.items} items)"))
    for i, title in enumerate(header):
        table.add_column(escape(title), justify="left" if i == 0 else "right",
                         overflow="fold" if i == 0 else "ellipsis")  # a long model label folds, not cut
    for row in rows:
        table.add_row(*map(escape, row))  # labels like teachers[broad] are not markup
    Console(stderr=to_stdout).print(table)
    for label, metrics in report.metrics.items():
        for name, values in metrics.items():
            if isinstance(values, dict) and values.get("unseen"):
                click.echo(f"note: {label}, task '{name}': {values['unseen']} of {values['n']} {split} rows have a "
                           "label training never saw; they are scored as wrong.", err=True)
    out = report.to_json()
    if to_stdout:
        click.echo(json.dumps(_jsonable(out), indent=2))
    elif json_out is not None:
        write_json(json_out, out)
        click.echo(f"metrics: {json_out}", err=True)
    return out
