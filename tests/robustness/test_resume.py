"""Crash and resume: a run SIGKILLed at any point and started again with the same command
ends with the same metrics and bit-identical files as a run that was never interrupted.

Each kill is a real SIGKILL of a ``distillkit run`` process. To hit a point exactly (a few
milliseconds separate a shard from the next on the toy data) the process is started through
``killpoint.py``, which kills it when a given file is renamed into place (or half-way through
writing it); see that module. One run directory goes through every kill in turn, then one
plain run finishes it; an uninterrupted run of the same config runs alongside as reference.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.robustness.support import DISTILLKIT, cli_env, dump_yaml, run_cli, small_toy, snapshot

# (where to kill, what the run directory must look like just after the kill)
KILLS = [
    # ensemble: the first teacher finished, the second one after its first epoch
    ("stages/.work/teachers-*/quadrant/last.safetensors#1@after",
     ["stages/.work/teachers-*/cluster/done.json", "stages/.work/teachers-*/quadrant/last.safetensors"],
     ["stages/teachers", "stages/.work/teachers-*/quadrant/done.json"]),
    # teacher-output cache: two shards written, the third one half-written, no index yet
    ("cache/teacher_outputs/*/shard-00002.safetensors#1@before",
     ["stages/m1/stage.json", "cache/teacher_outputs/*/shard-00001.safetensors",
      "cache/teacher_outputs/*/.shard-00002.safetensors.*.tmp"],
     ["cache/teacher_outputs/*/index.json", "stages/.work/m2-*/last.safetensors"]),
    # labeled distillation (m2): killed while writing its second epoch's checkpoint
    ("stages/.work/m2-*/last.safetensors#2@before",
     ["stages/.work/m2-*/last.safetensors", "stages/.work/m2-*/.last.safetensors.*.tmp"],
     ["stages/m2"]),
    # unlabeled distillation (m3): after its first epoch
    ("stages/.work/m3-*/last.safetensors#1@after",
     ["stages/m2/stage.json", "stages/.work/m3-*/last.safetensors"],
     ["stages/m3"]),
    # m3 finished, killed as its folder is about to move into place
    ("stages/m3#1@before",
     ["stages/.work/m3-*/stage.json", "stages/.work/m3-*/model.safetensors"],
     ["stages/m3", "stages/report"]),
]


def _config():
    # Small shards and evaluation batches: m2's training-split cache has four shards.
    return small_toy(m2={"teacher_outputs": {"mode": "cache", "shard_size": 16},
                         "training": {"eval_batch_size": 16}})


def _without_timing(path):
    data = json.loads(path.read_text())
    data.pop("seconds", None)
    return data


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_identical_results(tmp_path):
    config = dump_yaml(tmp_path / "toy.yaml", _config())
    # One intra-op thread: the models are tiny, and spinning OpenMP threads stall a busy machine.
    env = dict(cli_env(tmp_path / "cache"), OMP_NUM_THREADS="1")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    uninterrupted = subprocess.Popen(DISTILLKIT + ["run", str(config), "--out", str(reference), "--quiet"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for point, present, absent in KILLS:
            killed = run_cli(["run", str(config), "--out", str(resumed), "--quiet"], env, kill_at=point)
            assert killed.returncode == -9, f"{point}: not killed there (exit {killed.returncode}):\n{killed.stderr}"
            for pattern in present:
                assert list(resumed.glob(pattern)), f"after the kill at {point}: {pattern} is missing"
            for pattern in absent:
                assert not list(resumed.glob(pattern)), f"after the kill at {point}: {pattern} already exists"
        finished = run_cli(["run", str(config), "--out", str(resumed), "--quiet"], env)
        assert finished.returncode == 0, finished.stderr
    finally:
        _, stderr = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, stderr

    assert json.loads((resumed / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
    expected, got = snapshot(reference), snapshot(resumed)
    # Every file, models and checkpoints, caches, logs, metrics, summary, is byte-identical;
    # only stage.json differs, by the seconds the stage took.
    assert sorted(got) == sorted(expected), "the resumed run left other files (temporaries, .previous)"
    markers = sorted(k for k in expected if k.endswith("stage.json"))
    assert len(markers) == 5
    different = sorted(k for k in expected if got[k] != expected[k] and k not in markers)
    assert not different, f"not bit-identical after resuming: {different}"
    for marker in markers:
        assert _without_timing(resumed / marker) == _without_timing(reference / marker), marker
    assert len([k for k in expected if k.endswith("model.safetensors")]) == 5  # 2 teachers, m1, m2, m3
    assert len([k for k in expected if "teacher_outputs" in k and k.endswith("shard-00003.safetensors")]) == 1
