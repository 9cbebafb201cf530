"""``distillkit schema``: the run config's JSON Schema, for editors."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("schema")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSON Schema to this file instead of standard output.")
def schema(out: Path | None) -> None:
    """Print the JSON Schema of a run config for the installed plugins (every component kind
    they register, chosen by `kind:`), so that an editor checks a config as you type it.

    \b
    distillkit schema --out distillkit.schema.json
    # then, first line of a config (YAML language server, VS Code's YAML extension):
    # yaml-language-server: $schema=./distillkit.schema.json
    """
    import json

    from distillkit.io import atomic_write_text
    from distillkit.plugins import get_plugin_manager
    from distillkit.schema import config_schema

    text = json.dumps(config_schema(get_plugin_manager().registries).json_schema(), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        click.echo(f"wrote {out}", err=True)
