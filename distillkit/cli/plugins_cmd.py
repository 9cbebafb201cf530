"""``distillkit plugins``: installed plugins, their versions, components and commands."""

from __future__ import annotations

import click


@click.command()
def plugins() -> None:
    """List every loaded plugin with its version, the components it registers by kind and
    the commands it adds; then the plugins that could not be loaded, and why."""
    from distillkit.plugins import get_plugin_manager
    from distillkit.registry import KINDS

    manager = get_plugin_manager()
    manager.registries  # fill the registries so every plugin's components are known
    manager.collect_commands()  # the CLI added them already; not when called as a library
    for info in manager.info.values():
        click.echo(f"{info.name} {info.version} ({info.source})")
        for kind in KINDS:
            names = info.components.get(kind)
            if names:
                plural = "losses" if kind == "loss" else f"{kind}s"
                click.echo(f"  {plural}: {', '.join(sorted(names))}")
        if info.commands:
            click.echo(f"  commands: {', '.join(info.commands)}")
    for message in manager.failed.values():
        click.echo(message)
