"""``distillkit plugins``: installed plugins, their versions and components."""

from __future__ import annotations

import click


@click.command()
def plugins() -> None:
    """List every loaded plugin with its version and the components it registers, by kind."""
    from distillkit.plugins import get_plugin_manager
    from distillkit.registry import KINDS

    manager = get_plugin_manager()
    manager.registries  # fill the registries so every plugin's components are known
    for info in manager.info.values():
        click.echo(f"{info.name} {info.version} ({info.source})")
        for kind in KINDS:
            names = info.components.get(kind)
            if names:
                plural = "losses" if kind == "loss" else f"{kind}s"
                click.echo(f"  {plural}: {', '.join(sorted(names))}")
    for name, message in manager.failed.items():
        click.echo(f"{name} FAILED TO LOAD: {message}")
