"""``distillkit new-plugin NAME``: write a plugin package to start from."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("new-plugin")
@click.argument("name")
@click.option("--dir", "parent", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="The folder the package folder is created in.")
def new_plugin(name: str, parent: Path) -> None:
    """Write the plugin package NAME: a pyproject.toml with the distillkit entry point, a CSV
    dataset source, a classification task, a config that runs in seconds, and tests.

    Then: cd NAME && pip install -e . && distillkit plugins && pytest
    """
    from distillkit.scaffold import write_plugin

    root = write_plugin(name, parent)
    click.echo(f"wrote {root}")
    click.echo(f"next: cd {root} && pip install -e . && distillkit plugins && pytest")
