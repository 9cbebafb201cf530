"""``distillkit predict CHECKPOINT FILES...``: every task's prediction for user files."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("predict")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list (every class's probability included).")
@click.option("--data", "data_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A YAML file whose data: section names the dataset source that reads FILES (default: the one "
                   "the model was trained with, as its file or its run directory records).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A setting of that dataset source, e.g. --set image_size=224 (repeatable).")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Classes shown per classification task (default: the task's largest topk).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def predict_command(checkpoint: Path, files: tuple[Path, ...], as_json: bool, data_file: Path | None,
                    overrides: tuple[str, ...], top_k: int | None, device: str) -> None:
    """Predict every task of CHECKPOINT (a model .safetensors file) for FILES or folders of them.

    The dataset source the model was trained with reads the files (images for the eye plugin,
    rows of numbers for tabular sources), and the model applies the input transform fitted on
    its training split, so a file gives what evaluation gives on the same row. Prints the top
    classes with their probabilities for each classification task and the text of text tasks.
    """
    import json

    from distillkit.models import load_model
    from distillkit.plugins import get_plugin_manager
    from distillkit.prediction import checkpoint_source, collect_files, format_prediction, predict_rows
    from distillkit.runner import resolve_device

    registries = get_plugin_manager().registries
    loaded = load_model(checkpoint, registries, resolve_device(device))
    source = checkpoint_source(checkpoint, loaded.meta, registries, data_file, overrides)
    paths = collect_files(files, source.input_suffixes)
    results = predict_rows(loaded.model, loaded.tasks, source.load_inputs(paths), top_k)
    if as_json:
        click.echo(json.dumps([{source.input_kind: str(p), "tasks": r} for p, r in zip(paths, results)], indent=2))
        return
    for p, r in zip(paths, results):
        click.echo("\n".join(format_prediction(str(p), r)))
