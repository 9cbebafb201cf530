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


@click.command("eval-manifest")
@click.argument("model", metavar="RUN_OR_CHECKPOINT", type=click.Path(exists=True, path_type=Path))
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--image-size", type=click.IntRange(min=16), default=None,
              help="Side the images are resized to (default: the model's run's data.image_size, else 64).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Another setting of the manifest data source, e.g. --set split_column=suggested_split.")
@click.option("--stage", "stages", multiple=True, metavar="NAME", help="For a run directory: only these stages' models.")
@click.option("--group-by", default=None, metavar="NAME",
              help="Also report every metric per group: per true class of a classification task NAME, per value "
                   "of a data field NAME (one of the source's fields), or per group id (NAME 'group').")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the metrics as JSON to this file ('-' for standard output).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def eval_manifest_command(model: Path, manifest: Path, image_size: int | None, overrides: tuple[str, ...],
                          stages: tuple[str, ...], group_by: str | None, json_out: Path | None, device: str) -> None:
    """Evaluate a model (or a run's models) on every labeled row of a MANIFEST CSV.

    The shortcut for `distillkit eval RUN_OR_CHECKPOINT --data data.yaml --split all` with a
    data.yaml holding `data: {kind: manifest, path: MANIFEST, image_size: N}`.
    """
    from distillkit import DataSpec, RunDirectory, apply_overrides, find_run_dir, get_plugin_manager, run_eval
    from eye_fundus.predict import DEFAULT_IMAGE_SIZE

    if image_size is None:
        run = RunDirectory(model) if model.is_dir() else find_run_dir(model)
        image_size = (run.config.get("data") or {}).get("image_size") if run is not None else None
        image_size = int(image_size or DEFAULT_IMAGE_SIZE)
    data = apply_overrides({"kind": "manifest", "path": str(manifest.resolve()), "image_size": image_size},
                           list(overrides))
    spec = DataSpec.from_mapping({"data": data}, get_plugin_manager().registries, where=str(manifest),
                                 base_dir=Path.cwd())
    run_eval(model, spec, "all", stages=stages, group_by=group_by, json_out=json_out, device=device)


@click.command("convert-weights")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert_weights_command(checkpoint: Path, out: Path, force: bool) -> None:
    """Convert a .pth state dict (e.g. torchvision's resnet50-0676ba61.pth) to OUT.safetensors.

    The .pth is read with torch.load(weights_only=True); anything in it that is not a named
    tensor is refused. Then set `pretrained: OUT.safetensors` on the encoder.
    """
    from eye_fundus.weights import convert_checkpoint

    state = convert_checkpoint(checkpoint, out, overwrite=force)
    values = sum(t.numel() for t in state.values())
    click.echo(f"wrote {out}: {len(state)} tensors, {values:,} values")


def add_commands(cli: click.Group) -> None:
    cli.add_command(import_odir_command)
    cli.add_command(eval_manifest_command)
    cli.add_command(convert_weights_command)
