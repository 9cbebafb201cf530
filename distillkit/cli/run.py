"""``distillkit run CONFIG``: run (or resume) every stage of a config."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: runs/<config name>). An interrupted run there is resumed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set training.epochs=3 (repeatable).")
@click.option("--quiet", is_flag=True, help="Print only the final table.")
def run(config: Path, out: Path | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Run every stage of CONFIG in dependency order.

    Finished stages whose config and inputs are unchanged are skipped; an interrupted stage
    resumes from its last checkpoint.
    """
    from distillkit.config import load_config
    from distillkit.plugins import get_plugin_manager
    from distillkit.progress import Reporter
    from distillkit.rundir import RunLayout
    from distillkit.runner import Runner

    registries = get_plugin_manager().registries
    cfg = load_config(config, registries, list(overrides))
    run_dir = out if out is not None else Path("runs") / cfg.name
    Runner(cfg, registries, run_dir, Reporter(quiet=quiet)).run()
    click.echo(f"results: {RunLayout(run_dir).metrics}", err=True)
