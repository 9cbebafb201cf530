"""Commands the eye plugin adds to ``distillkit``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("import-odir")
@click.argument("xlsx", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("image_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_csv", type=click.Path(dir_okay=False, path_type=Path))
def import_odir_command(xlsx: Path, image_dir: Path, out_csv: Path) -> None:
    """Write a manifest CSV from the ODIR-5K annotation spreadsheet (one row per eye)."""
    from eye_fundus.importers.odir import import_odir

    report = import_odir(xlsx, image_dir, out_csv)
    click.echo(str(report) if report is not None else f"wrote {out_csv}")


def add_commands(cli: click.Group) -> None:
    cli.add_command(import_odir_command)
