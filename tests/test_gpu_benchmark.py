"""benchmarks/gpu_throughput.py on the CPU at tiny sizes: its table and JSON agree with each other
and with images/s = batch x steps / seconds (warm-up excluded), the ratio is distill / plain, and
without CUDA it refuses to run unless told --device cpu."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_throughput as bench
from tests.conftest import REPO

pytest.importorskip("torchvision")  # the benchmark's students are the eye plugin's ResNets

ROW = re.compile(r"^(?P<mode>\S.*?)\s+(?P<precision>fp32|bf16|fp16)\s+(?P<ips>\d+\.\d{2})\s+(?P<ms>\d+\.\d{2})$")
RATIO = re.compile(r"^ratio distill / plain images/s: (?P<ratio>\d+\.\d{3}) ")


def _table(out: str) -> tuple[list[dict], float]:
    rows = [m.groupdict() for m in map(ROW.match, out.splitlines()) if m]
    ratios = [float(m["ratio"]) for m in map(RATIO.match, out.splitlines()) if m]
    assert len(ratios) == 1, out
    return rows, ratios[0]


@pytest.mark.slow
def test_cpu_run_prints_a_table_that_agrees_with_its_json(tmp_path, capsys, fresh_plugin_manager):
    path = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--steps", "2",
            "--warmup", "1", "--rounds", "3", "--precision", "fp32,bf16", "--json", str(path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    rows, printed_ratio = _table(out)

    assert [(r["mode"], r["precision"]) for r in rows] == [
        ("train + fundus_jitter", "fp32"), ("train + fundus_jitter", "bf16"),
        ("plain (no augmentation)", "fp32"), ("distill, cached 3 teachers", "fp32")]
    assert (result["arch"], result["image_size"], result["batch_size"], result["steps"]) == ("resnet18", 32, 4, 2)
    assert result["channels_last"] is True and result["augment"] == "fundus_jitter"
    distill = result["distillation"]
    assert distill["precision"] == "fp32" and distill["teachers"] == 3 and distill["rounds"] == 3
    figures = result["training"] + [distill["plain"], distill["distill"]]
    for row, fig in zip(rows, figures):
        # images/s = batch x steps / seconds, ms/step = seconds / steps; the table shows the JSON's values
        assert fig["images"] == 4 * 2
        assert math.isclose(fig["images_per_s"], fig["images"] / fig["seconds"], rel_tol=1e-12)
        assert math.isclose(fig["ms_per_step"], 1000 * fig["seconds"] / 2, rel_tol=1e-12)
        assert abs(float(row["ips"]) - fig["images_per_s"]) <= 0.005 + 1e-9
        assert abs(float(row["ms"]) - fig["ms_per_step"]) <= 0.005 + 1e-9
        assert math.isfinite(fig["last_loss"]) and fig["last_loss"] > 0
    for name in ("plain", "distill"):  # (b) reports the median round
        rounds = distill[name]["rounds_seconds"]
        assert len(rounds) == 3 and distill[name]["seconds"] == sorted(rounds)[1]
    assert math.isclose(distill["ratio"], distill["distill"]["images_per_s"] / distill["plain"]["images_per_s"],
                        rel_tol=1e-12)
    # the printed ratio is distill / plain of the printed images/s, within their rounding (two decimals)
    d, p = float(rows[3]["ips"]), float(rows[2]["ips"])
    assert (d - 0.005) / (p + 0.005) - 0.0005 <= printed_ratio <= (d + 0.005) / (p - 0.005) + 0.0005
    assert abs(printed_ratio - distill["ratio"]) <= 0.0005 + 1e-12


class _Clock:
    """A clock that moves only when a training step runs: 1 s for a plain step, 3 s for a step
    with soft targets, so every figure the benchmark prints is known in advance."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        real_step = bench._train_step

        def step(model, tasks, loss_fn, optimizer, scaler, params, inputs, targets, soft, *rest):
            out = real_step(model, tasks, loss_fn, optimizer, scaler, params, inputs, targets, soft, *rest)
            self.now += 1.0 if soft is None else 3.0
            return out

        monkeypatch.setattr(bench, "_train_step", step)
        monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: self.now))


def test_figures_are_timed_steps_only_and_the_ratio_is_distill_over_plain(tmp_path, capsys, monkeypatch,
                                                                          fresh_plugin_manager):
    _Clock(monkeypatch)
    path = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--arch", "small_cnn", "--image-size", "32", "--batch-size", "4", "--steps", "3",
            "--warmup", "2", "--rounds", "2", "--precision", "bf16", "--no-channels-last", "--augment", "none",
            "--json", str(path)]
    assert bench.main(argv) == 0
    rows, printed_ratio = _table(capsys.readouterr().out)
    result = json.loads(path.read_text())
    # 3 timed steps of 1 s: the 2 warm-up steps (and the teacher-output cache build) are not in the time
    (train,) = result["training"]
    assert (train["precision"], train["seconds"], train["images_per_s"], train["ms_per_step"]) == \
           ("bf16", 3.0, 4.0, 1000.0)
    plain, distill = result["distillation"]["plain"], result["distillation"]["distill"]
    assert plain["rounds_seconds"] == [3.0, 3.0] and distill["rounds_seconds"] == [9.0, 9.0]
    assert plain["images_per_s"] == 12 / 3 and distill["images_per_s"] == 12 / 9
    assert result["distillation"]["ratio"] == pytest.approx(1 / 3, rel=1e-12)
    assert printed_ratio == 0.333
    assert [(r["mode"], r["precision"], r["ips"], r["ms"]) for r in rows] == [
        ("train", "bf16", "4.00", "1000.00"), ("plain (no augmentation)", "bf16", "4.00", "1000.00"),
        ("distill, cached 3 teachers", "bf16", "1.33", "3000.00")]
    assert result["channels_last"] is False and result["augment"] == "none"


def test_without_cuda_it_exits_2_with_one_line_unless_told_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--steps", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "--device cpu" in lines[0]


def test_python_dash_m_exits_with_status_2_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, even on a machine that has one
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_throughput"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "CUDA is not available" in proc.stderr


def test_fp16_on_the_cpu_is_refused_with_status_2(capsys):
    assert bench.main(["--device", "cpu", "--precision", "bf16,fp16"]) == 2
    err = capsys.readouterr().err
    assert "--precision fp16" in err and "CUDA" in err and len(err.strip().splitlines()) == 1
