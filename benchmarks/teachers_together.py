"""Teachers trained together against one after the other: the main job's ensemble stage.

The ``teachers`` stage of plugins/eye_fundus/m3.yaml (six subset teachers, small CNN, 64 px),
with fewer epochs and no early stopping so that both modes train every teacher for the same
number of epochs, run by ``distillkit run`` in this process with ``together: false`` and
``together: true``, rounds alternating. Prints each run's stage time (``stage.json``'s
``seconds``: training, validation and the final evaluation of every teacher), the ratio of
the medians, whether both modes gave the same teachers, and the cost of one pass over the
training batches (what training together saves, per teacher beyond the first and per epoch).

    python -m benchmarks.teachers_together [--epochs 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner

from distillkit.cli import cli
from distillkit.config import validate_config
from distillkit.data import iterate_batches
from distillkit.plugins import PluginManager, set_plugin_manager
from distillkit.runner import Runner

M3 = Path(__file__).resolve().parents[1] / "plugins" / "eye_fundus" / "m3.yaml"


def config(epochs: int, together: bool) -> dict:
    data = yaml.safe_load(M3.read_text())
    data["training"].update(epochs=epochs, early_stopping=None)
    data["stages"] = {"teachers": dict(data["stages"]["teachers"], together=together)}
    return data


def run(folder: Path, epochs: int, together: bool) -> dict:
    """Run the stage into a fresh folder; its stage.json."""
    folder.mkdir(parents=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config(epochs, together), sort_keys=False))
    set_plugin_manager(None)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return json.loads((folder / "run" / "stages" / "teachers" / "stage.json").read_text())


def data_pass_seconds(epochs: int, repeats: int = 5) -> tuple[float, int]:
    """Median time of one pass over the training batches (gather, targets of all tasks); rows."""
    registries = PluginManager().registries
    runner = Runner(validate_config(config(epochs, True), registries), registries, Path(tempfile.mkdtemp()))
    runner.prepare_data()
    train = runner.splits["train"]
    times = []
    for epoch in range(repeats):
        start = time.perf_counter()
        for _ in iterate_batches(train, 64, shuffle=True, seed=0, epoch=epoch, tasks=list(runner.tasks)):
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(train)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distillkit-bench-together-"))
    os.environ.setdefault("DISTILLKIT_CACHE", str(tmp / "cache"))
    print(f"m3.yaml's ensemble stage (6 teachers), {args.epochs} epochs, no early stopping, "
          f"{torch.get_num_threads()} threads")
    run(tmp / "warmup", 1, False)  # generates and caches the synthetic data set
    seconds: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    for r in range(args.rounds):
        for together in ((False, True) if r % 2 == 0 else (True, False)):
            stage = run(tmp / f"round{r}-{together}", args.epochs, together)
            seconds[together].append(stage["seconds"])
            results[together] = stage["result"]
            print(f"round {r}: {'together  ' if together else 'sequential'} {stage['seconds']:.1f} s", flush=True)
    seq, tog = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"sequential {seq:.1f} s, together {tog:.1f} s: ratio {tog / seq:.3f} (goal <= 0.7)")
    print(f"same teachers (checksums, scores, metrics): {results[False] == results[True]}")
    one_pass, rows = data_pass_seconds(args.epochs)
    saved = one_pass * args.epochs * 5
    print(f"one pass over the {rows} training rows' batches: {one_pass * 1000:.1f} ms; together saves "
          f"5 of 6 passes per epoch: {saved:.2f} s of {seq:.1f} s ({100 * saved / seq:.2f}%)")


if __name__ == "__main__":
    main()
