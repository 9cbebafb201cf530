"""The ``distillkit`` command line: a thin click group, one module per command.

Heavy imports (torch) happen inside command bodies so that ``distillkit --help`` is instant.
A user mistake (:class:`distillkit.errors.DistillkitError`) prints one paragraph and exits
with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from distillkit import __version__
from distillkit.errors import DistillkitError

EXIT_USER_ERROR = 2


class DistillkitGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DistillkitError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            from distillkit.distributed import launched_rank

            if launched_rank() == 0:  # under torchrun every rank stops; rank 0 says why
                click.echo(f"error: {exc.render()}{_left_out_plugins(exc)}", err=True)
            else:
                # torchrun ends the other ranks as soon as one exits: rank 0 goes first, so
                # that it has said why and its exit status is the job's
                import time

                time.sleep(3)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume.", err=True)
            ctx.exit(130)


def _left_out_plugins(exc: DistillkitError) -> str:
    """An unknown kind may be one a plugin that failed to load would have registered: say so."""
    from distillkit import plugins

    manager = plugins._default  # never load plugins here: only report what loading found
    if manager is None or not manager.failed or "unknown " not in exc.render():
        return ""
    names = ", ".join(f"'{name}'" for name in manager.failed)
    noun = "plugin" if len(manager.failed) == 1 else "plugins"
    return (f"\nNote: {noun} {names} failed to load (see the warning above); a kind it registers is "
            f"unknown until it loads.")


@click.group(cls=DistillkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="distillkit")
@click.option("--debug", is_flag=True, envvar="DISTILLKIT_DEBUG", help="Show tracebacks for user errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """distillkit: multi-task, multi-teacher knowledge distillation.

    \b
    distillkit validate CONFIG    check a config and print the plan
    distillkit run CONFIG         run every stage (resumes an interrupted run)
    distillkit sweep SWEEP        run a config over a grid (seeds, p, tau), stages shared
    distillkit plugins            list plugins, their components and commands
    distillkit config-doc         every config section and key, as Markdown
    distillkit schema             the config's JSON Schema, for editors
    distillkit new-plugin NAME    start a plugin package
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _add_builtin_commands() -> None:
    from distillkit.cli import (config_doc_cmd, eval_cmd, new_plugin_cmd, plugins_cmd, predict_cmd, report_cmd, run,
                                schema_cmd, sweep_cmd, validate)

    cli.add_command(run.run)
    cli.add_command(validate.validate)
    cli.add_command(plugins_cmd.plugins)
    cli.add_command(eval_cmd.eval_command)
    cli.add_command(predict_cmd.predict_command)
    cli.add_command(report_cmd.report)
    cli.add_command(sweep_cmd.sweep)
    cli.add_command(config_doc_cmd.config_doc)
    cli.add_command(schema_cmd.schema)
    cli.add_command(new_plugin_cmd.new_plugin)


def _add_plugin_commands() -> None:
    from distillkit.plugins import get_plugin_manager

    try:
        # A plugin that fails to import or whose hook raises is logged once as a warning line
        # (naming the extra to install) and left out; the rest of the CLI works without it.
        get_plugin_manager().add_commands(cli)
    except DistillkitError as exc:
        # A broken plugin must not take the whole CLI down; its commands are missing.
        if os.environ.get("DISTILLKIT_DEBUG"):
            raise
        click.echo(f"warning: {exc.render()}", err=True)


_add_builtin_commands()


class _WarningLines(logging.Handler):
    """Logged warnings (counted conversions, skipped labels) as ``warning: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


def main() -> None:
    if not logging.getLogger().handlers:  # an embedding program's own logging set-up wins
        logging.getLogger().addHandler(_WarningLines(logging.WARNING))
    _add_plugin_commands()
    cli(prog_name="distillkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
