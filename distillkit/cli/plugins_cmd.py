"""``distillkit plugins``: installed plugins, their versions, components and commands."""

from __future__ import annotations

import click


@click.command()
@click.pass_context
def plugins(ctx: click.Context) -> None:
    """List every loaded plugin with its version, the components it registers by kind and
    the commands it adds; then the plugins that could not be loaded, and why."""
    from distillkit.plugins import get_plugin_manager
    from distillkit.registry import KINDS

    manager = get_plugin_manager()
    manager.registries  # fill the registries so every plugin's components are known
    manager.collect_commands()  # the CLI added them already; not when called as a library
    from_plugins = {c for info in manager.info.values() for c in info.commands}
    core = sorted(c for c in getattr(ctx.find_root().command, "commands", {}) if c not in from_plugins)
    for info in manager.info.values():
        click.echo(f"{info.name} {info.version} ({info.source})")
        for kind in KINDS:
            names = info.components.get(kind)
            if names:
                plural = "losses" if kind == "loss" else f"{kind}s"
                click.echo(f"  {plural}: {', '.join(sorted(names))}")
        commands = core if info.source == "builtin" else info.commands
        if commands:
            click.echo(f"  commands: {', '.join(commands)}")
    for message in manager.failed.values():
        click.echo(message)
