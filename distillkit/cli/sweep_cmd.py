"""``distillkit sweep SWEEP.yaml``: a base config over a grid of overrides, stages shared by key."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Sweep directory (default: runs/<sweep name>). An interrupted sweep there is resumed.")
@click.option("--dry-run", is_flag=True, help="Check the sweep and list its runs; train nothing.")
def sweep(sweep_file: Path, out: Path | None, dry_run: bool) -> None:
    """Run the base config of SWEEP_FILE at every point of its grid.

    A stage identical in two runs (same stage key) trains once and is linked into the other.
    Writes sweep.json and the tables results.md / results.csv (mean and 95% CI over seeds).
    """
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from distillkit.plugins import get_plugin_manager
    from distillkit.sweep import load_sweep, run_sweep

    from distillkit.distributed import world_from_env
    from distillkit.errors import DistillkitError

    if world_from_env() is not None:
        raise DistillkitError("a sweep runs in one process, not under torchrun: every rank would write the same "
                              "run directories.", where="WORLD_SIZE",
                              hint="Run the sweep without torchrun, or run one of its configs with "
                                   "distillkit run CONFIG --nproc N.")
    registries = get_plugin_manager().registries
    spec = load_sweep(sweep_file, registries)
    out = out if out is not None else Path("runs") / spec.name
    console = Console(stderr=True)
    if dry_run:
        for run in spec.runs:
            console.print(f"{run.id}  {json.dumps(run.overrides)}")
        console.print(f"{len(spec.runs)} runs")
        return
    with Progress(TextColumn("[bold]sweep[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console) as bar:
        task = bar.add_task("", total=len(spec.runs))

        def progress(index, total, run, trained, reused):
            bar.update(task, completed=index,
                       description=f"{json.dumps(run.overrides)}: train {len(trained)}, reuse {len(reused)}")

        outcome = run_sweep(spec, registries, out, progress)
        bar.update(task, completed=len(spec.runs), description="done")
    s = outcome.summary
    click.echo(f"stages trained {s['stages_trained']} of {s['stages_naive']} (separate runs); "
               f"wall {s['timing']['wall']:.1f}s, unique stages {s['timing']['unique_stage_seconds']:.1f}s", err=True)
    click.echo((out / "results.md").read_text(encoding="utf-8"))
    click.echo(f"results: {outcome.path}", err=True)
