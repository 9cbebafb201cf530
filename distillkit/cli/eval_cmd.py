"""``distillkit eval``: metrics of trained models on any split of any config's data."""

from __future__ import annotations

from pathlib import Path

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
    from distillkit.evaluation import run_eval
    from distillkit.plugins import get_plugin_manager

    spec = None
    if data_file is not None:
        spec = DataSpec.from_file(data_file, get_plugin_manager().registries, overrides)
    elif overrides:
        raise DistillkitError("--set needs a --data file to override.", where="--set")
    run_eval(model, spec, split, stages=stages, group_by=group_by, json_out=json_out, batch_size=batch_size,
             device=device)

