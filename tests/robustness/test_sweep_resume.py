"""A sweep SIGKILLed at any point and resumed gives the same tables as an uninterrupted one."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.robustness.support import DISTILLKIT, cli_env, run_cli, small_toy

# (kill point relative to --out, as killpoint.py takes it)
KILLS = [  # each process gets a little further than the one before
    "store/teachers-*#1@after",   # the first stage stored, its run not finished
    "runs/*/stages/m2#1@after",   # mid-run, after a stage moved into place
    "store/m3-*#1@before",        # the run finished, its stages not all stored
    "runs/*/stages/m1#1@after",   # the next run's m1 just linked in from the store
    "sweep.json#1@before",        # sweep.json cut half-way through its write
    "results.md#1@after",         # the tables half written
]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_tables(tmp_path):
    config = small_toy()
    config["training"].update(epochs=1)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    spec = {"base": "base.yaml", "grid": {"seed": [0, 1], "stages.m2.temperature": [1.0, 4.0]},
            "table": {"columns": "stages.m2.temperature", "rows": {"M1": "m1", "M2": "m2", "M3": "m3"},
                      "baseline": "M1"}}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    env = dict(cli_env(tmp_path / "cache"), OMP_NUM_THREADS="1")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    uninterrupted = subprocess.run(DISTILLKIT + ["sweep", str(sweep), "--out", str(reference)], env=env,
                                   capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    for point in KILLS:
        killed = run_cli(["sweep", str(sweep), "--out", str(resumed)], env, kill_at=point, timeout=300)
        assert killed.returncode == -9, f"{point}: not killed there (exit {killed.returncode}):\n{killed.stderr}"
    finished = run_cli(["sweep", str(sweep), "--out", str(resumed)], env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    for name in ("results.md", "results.csv"):
        assert (resumed / name).read_text() == (reference / name).read_text(), name
    import json

    got, expected = (json.loads((d / "sweep.json").read_text()) for d in (resumed, reference))
    assert got["stages_trained"] == expected["stages_trained"] == 16
    assert [r["metrics"] for r in got["runs"]] == [r["metrics"] for r in expected["runs"]]
    assert not list(resumed.rglob("*.incoming")) and not list(resumed.rglob(".*.tmp"))
