"""``distillkit eval``: metrics of trained models on any split of any config's data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click

SPLIT_NAMES = ["train", "val", "test", "all"]


@click.command("eval")
@click.argument("model", metavar="RUN_OR_CHECKPOINT", type=click.Path(exists=True, path_type=Path))
@click.option("--data", "data_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A run config, a run's config.yaml, or a YAML file with only a data: section (and "
                   "optionally split:). Default: the data of the run the model belongs to.")
@click.option("--split", type=click.Choice(SPLIT_NAMES), default="test", show_default=True,
              help="Which split of the data (the run's patient-level split); 'all': every labeled item.")
@click.option("--stage", "stages", multiple=True, metavar="NAME",
              help="For a run directory: only these stages' models (default: those its evaluate stages "
                   "compared, else every model). Repeatable.")
@click.option("--group-by", default=None, metavar="NAME",
              help="Also report every metric per group: per true class of a classification task NAME, per value "
                   "of a data field NAME, or per group id (NAME 'group').")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value of the --data file.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the metrics as JSON to this file ('-' for standard output).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def eval_command(model: Path, data_file: Path | None, split: str, stages: tuple[str, ...], group_by: str | None,
                 overrides: tuple[str, ...], json_out: Path | None, batch_size: int, device: str) -> None:
    """Evaluate RUN_OR_CHECKPOINT (a model .safetensors file, or a run directory) on a split.

    Labels are encoded with each model's own class lists and vocabulary (from its checkpoint),
    so on the run's own data the numbers equal those its evaluate stage recorded.
    """
    from distillkit.data_spec import DataSpec
    from distillkit.errors import DistillkitError
    from distillkit.plugins import get_plugin_manager

    spec = None
    if data_file is not None:
        spec = DataSpec.from_file(data_file, get_plugin_manager().registries, overrides)
    elif overrides:
        raise DistillkitError("--set needs a --data file to override.", where="--set")
    run_eval(model, spec, split, stages=stages, group_by=group_by, json_out=json_out, batch_size=batch_size,
             device=device)


def run_eval(model: Path, spec: Any, split: str, *, stages: Sequence[str] = (), group_by: str | None = None,
             json_out: Path | None = None, batch_size: int = 256, device: str = "auto") -> dict[str, Any]:
    """The body of ``distillkit eval``, for plugins that offer other ways to name the data.

    ``spec`` is a :class:`distillkit.data_spec.DataSpec`, or ``None`` for the data of the run
    the model belongs to. Prints the table, writes ``json_out`` and returns what it holds.
    """
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from distillkit.errors import DistillkitError
    from distillkit.evaluation import evaluate_checkpoints, summary_rows
    from distillkit.io import _jsonable, write_json
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
        data = run.load_data(registries, warn=lambda m: click.echo(m, err=True))
    else:
        raise DistillkitError(f"{model} is not inside a run directory, so its data is unknown; give --data "
                              "(a config, or a YAML file with a data: section).", where="--data")

    results, tasks = evaluate_checkpoints(models, data, split, registries, resolve_device(device), batch_size,
                                          group_by)
    header, rows = summary_rows(results, tasks)
    to_stdout = json_out is not None and str(json_out) == "-"
    table = Table(title=escape(f"{split} split of {data.where} ({len(data.rows(split))} items)"))
    for i, title in enumerate(header):
        table.add_column(escape(title), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*map(escape, row))  # labels like teachers[broad] are not markup
    Console(stderr=to_stdout).print(table)
    for label, metrics in results.items():
        for name, values in metrics.items():
            if isinstance(values, dict) and values.get("unseen"):
                click.echo(f"note: {label}, task '{name}': {values['unseen']} of {values['n']} {split} rows have a "
                           "label training never saw; they are scored as wrong.", err=True)
    report = {"split": split, "data": data.where, "data_fingerprint": data.fingerprint,
              "models": {label: str(path) for label, path in models}, "metrics": results}
    if to_stdout:
        click.echo(json.dumps(_jsonable(report), indent=2))
    elif json_out is not None:
        write_json(json_out, report)
        click.echo(f"metrics: {json_out}", err=True)
    return report
