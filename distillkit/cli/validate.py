"""``distillkit validate CONFIG``: check a config and print the plan; trains nothing."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable).")
def validate(config: Path, overrides: tuple[str, ...]) -> None:
    """Validate CONFIG and print the stages in order: what each trains, from which
    initialisation and with which teachers. Loads no data and trains nothing."""
    from distillkit.config import load_config
    from distillkit.feature_cache import check_frozen_encoders
    from distillkit.plugins import get_plugin_manager
    from distillkit.runner import check_mixed_precision, describe_plan, plan

    registries = get_plugin_manager().registries
    cfg = load_config(config, registries, list(overrides))
    check_frozen_encoders(cfg.student, registries, cfg.file)
    if cfg.device == "cpu":  # `auto` or `cuda` may run elsewhere: only an explicit CPU is known here
        import torch

        check_mixed_precision(cfg, torch.device("cpu"))
    planned = plan(cfg, registries)
    click.echo(f"{config}: valid. {len(cfg.tasks)} task(s), {len(planned)} stage(s).")
    for name, task in cfg.tasks.items():
        click.echo(f"  task {name}: {task.kind}" + (f" (field {task.field})" if getattr(task, "field", None) else ""))
    click.echo(f"  data: {cfg.data.kind}; student: {cfg.student.kind} with encoder {cfg.student.encoder.kind}")
    click.echo("plan:")
    for line in describe_plan(planned):
        click.echo(f"  {line}")
