"""``distillkit config-doc``: the config reference for the installed plugins."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("config-doc")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the Markdown to this file instead of standard output.")
def config_doc(out: Path | None) -> None:
    """Print every config section and key (type, default, description) as Markdown, including
    the parameters of every component the installed plugins register."""
    from distillkit.config_doc import config_reference
    from distillkit.io import atomic_write_text
    from distillkit.plugins import get_plugin_manager

    manager = get_plugin_manager()
    text = config_reference(manager.registries, list(manager.info))
    if out is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        click.echo(f"wrote {out}", err=True)
