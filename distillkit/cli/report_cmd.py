"""``distillkit report RUN_DIR``: one self-contained HTML page with the run's tables and figures."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file; its PNG figures and report.json go next to it. Default: RUN_DIR/report/report.html.")
@click.option("--images-per-class", default=2, show_default=True, type=click.IntRange(1, 20),
              help="Grad-CAM rows per class of the evaluate stage's group_by task.")
@click.option("--gradcam-model", "gradcam_models", multiple=True, metavar="LABEL",
              help="Models whose Grad-CAM maps are shown, e.g. m1 (repeatable). Default: the first and the last "
                   "model the evaluate stage compared (M1 and M3).")
@click.option("--group-metric", "group_metrics", multiple=True, metavar="TASK=METRIC",
              help="The metric shown per group for TASK (default: its primary metric), e.g. "
                   "text=bleu_sentence_avg. Repeatable.")
@click.option("--no-data", is_flag=True, help="Only what the run directory holds: no top-K curves or Grad-CAM "
                                              "(those re-create the run's data and re-run its models).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def report(run_dir: Path, out: Path | None, images_per_class: int, gradcam_models: tuple[str, ...],
           group_metrics: tuple[str, ...], no_data: bool, device: str) -> None:
    """Write an HTML report of RUN_DIR (for a sweep folder: its tables and figure): metrics table, confusion matrix, metrics per group, learning
    curves, top-K accuracy per group and Grad-CAM maps (the paper's Fig. 4 and 5)."""
    from distillkit.errors import DistillkitError
    from distillkit.plugins import get_plugin_manager
    from distillkit.report import build_report
    from distillkit.runner import resolve_device

    if (run_dir / "sweep.json").is_file():  # a sweep folder: its tables and figure
        from distillkit.io import read_json
        from distillkit.sweep import write_tables

        written = write_tables(run_dir, None, read_json(run_dir / "sweep.json"))
        click.echo((run_dir / "results.md").read_text(encoding="utf-8"))
        click.echo(f"report: {', '.join(str(p) for p in written)}")
        return
    chosen = {}
    for item in group_metrics:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise DistillkitError(f"'{item}' must look like TASK=METRIC, e.g. text=bleu_sentence_avg.",
                                  where="--group-metric")
        chosen[task.strip()] = metric.strip()
    result = build_report(run_dir, get_plugin_manager().registries, out, images_per_class=images_per_class,
                          gradcam_models=gradcam_models or None, device=resolve_device(device), use_data=not no_data,
                          group_metrics=chosen,
                          warn=lambda message: click.echo(message, err=True))
    for message in result.notes:
        click.echo(f"note: {message}", err=True)
    click.echo(f"report: {result.html_path} ({len(result.figures)} figures)")
