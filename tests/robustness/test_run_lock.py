"""Two runs into one directory: the second is refused while the first holds the lock, and the
lock dies with its process (flock), so a run after a SIGKILL proceeds without cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

from distillkit.cli import cli
from tests.robustness.support import DISTILLKIT, cli_env, dump_yaml, error_paragraph, small_toy, snapshot


def _wait_for_lock(process: subprocess.Popen, lock, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().strip() == f"pid {process.pid}":
            return
        assert process.poll() is None, f"the first run ended early: {process.communicate()[1]}"
        time.sleep(0.01)
    raise AssertionError("the first run never took the lock")


@pytest.mark.slow
def test_a_second_run_is_refused_until_the_first_is_killed(tmp_path, monkeypatch, fresh_plugin_manager):
    config = dump_yaml(tmp_path / "toy.yaml", small_toy())
    out = tmp_path / "run"
    env = dict(cli_env(tmp_path / "cache"), OMP_NUM_THREADS="1")
    for name in ("DISTILLKIT_CACHE", "DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.setenv(name, env[name])
    first = subprocess.Popen(DISTILLKIT + ["run", str(config), "--out", str(out), "--quiet"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(first, out / ".lock")
        # Frozen, the first run keeps its lock for as long as this test needs.
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot(out)

        second = CliRunner().invoke(cli, ["run", str(config), "--out", str(out), "--quiet"])
        assert second.exit_code == 2, second.output
        message = error_paragraph(second.output)
        assert f"another distillkit run (pid {first.pid}) is writing to this directory" in message
        assert str(out) in message and "choose another --out" in message
        assert snapshot(out) == before

        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    third = CliRunner().invoke(cli, ["run", str(config), "--out", str(out), "--quiet"])
    assert third.exit_code == 0, third.output
    assert set(json.loads((out / "metrics.json").read_text())) == {"teachers", "m1", "m2", "m3", "report"}
    assert (out / ".lock").read_text() == f"pid {os.getpid()}"
