"""Sweep overhead: wall time of ``run_sweep`` over the sum of its unique stages' training times.

Runs examples/toy_sweep.yaml (2 seeds x 2 temperatures) into a temporary folder and prints
wall / sum(unique stage seconds); the goal is <= 1.05 (planning, data loading per run, linking
shared stages from the store and writing the tables are the overhead).

    python -m benchmarks.sweep_overhead
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from distillkit.plugins import get_plugin_manager
    from distillkit.sweep import load_sweep, run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DISTILLKIT_CACHE", str(Path(tmp) / "cache"))
        registries = get_plugin_manager().registries
        spec = load_sweep(REPO / "examples" / "toy_sweep.yaml", registries)
        started = time.perf_counter()
        outcome = run_sweep(spec, registries, Path(tmp) / "out")
        wall = time.perf_counter() - started
        s = outcome.summary
        unique = s["timing"]["unique_stage_seconds"]
        print(f"sweep overhead (toy_sweep, {len(spec.runs)} runs): stages trained {s['stages_trained']} "
              f"of {s['stages_naive']} naive; wall {wall:.1f}s, unique stages {unique:.1f}s, "
              f"wall/unique {wall / unique:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
