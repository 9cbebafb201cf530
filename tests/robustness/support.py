"""Builders and checks shared by the robustness tests: small image data sets, checkpoints,
run-directory snapshots and the shape of a user-error message."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from tests.conftest import REPO, toy_config

#: the console script, as a user runs it
DISTILLKIT = [str(Path(sys.executable).with_name("distillkit"))]
KILLPOINT = [sys.executable, str(Path(__file__).with_name("killpoint.py"))]


# -- configs ---------------------------------------------------------------------------------

def small_toy(**stage_updates: Any) -> dict:
    """The toy example shrunk for tests, with an explicitly cached distillation stage."""
    config = toy_config()
    config["stages"]["m2"]["teacher_outputs"] = {"mode": "cache"}
    for name, update in stage_updates.items():
        config["stages"][name].update(update)
    return config


def image_config(manifest: str = "manifest.csv", **data: Any) -> dict:
    """A tiny config over the eye plugin's ``manifest`` source: one task, one stage, one epoch."""
    return {
        "name": "images",
        "seed": 0,
        "data": {"kind": "manifest", "path": manifest, "image_size": 16, **data},
        "tasks": {"broad": {"kind": "classification", "field": "broad_label", "hidden": 8}},
        "student": {"kind": "multitask", "encoder": {"kind": "small_cnn", "width": 4, "depth": 2}},
        "training": {"epochs": 1, "batch_size": 8, "early_stopping": None},
        "stages": {"m1": {"kind": "train"}},
    }


def dump_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# -- images and manifests --------------------------------------------------------------------

def save_png(path: Path, seed: int, mode: str = "RGB") -> Path:
    """A 16x16 picture in ``mode`` (RGB, L, or I;16 for 16-bit grayscale)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(path)
    elif mode == "L":
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), mode="L").save(path)
    else:
        image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
    return path


def image_dataset(folder: Path, n: int = 20, rows: Iterable[str] = (), header: str | None = None,
                  extra_column: str | None = None) -> Path:
    """``n`` RGB PNGs of ``n`` patients, labels alternating a/b, plus extra raw ``rows``.

    Returns the manifest path (``folder/manifest.csv``).
    """
    header = header or "image,patient_id,broad_label,fine_label,diagnosis_text" + (
        f",{extra_column}" if extra_column else "")
    lines = [header]
    for i in range(n):
        save_png(folder / "images" / f"{i}.png", i)
        extra = ",train" if extra_column else ""
        lines.append(f"images/{i}.png,p{i},{'ab'[i % 2]},fine {'ab'[i % 2]},text {'ab'[i % 2]}{extra}")
    lines += list(rows)
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


# -- run directories -------------------------------------------------------------------------

def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``run_dir`` (the lock file excluded), by relative path."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.name != ".lock":
            out[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_untouched(before: dict[str, str], run_dir: Path) -> None:
    """Every earlier file is still there, byte for byte; new files only where a run keeps its
    in-progress state (``stages/.work/``) and reusable caches (``cache/``)."""
    after = snapshot(run_dir)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"a failed run changed or removed earlier results: {changed}"
    new = sorted(k for k in after if k not in before and not k.startswith(("stages/.work/", "cache/")))
    assert not new, f"a failed run wrote results outside its work area: {new}"


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


# -- messages --------------------------------------------------------------------------------

def error_paragraph(output: str) -> str:
    """The user-error paragraph of a CLI output; asserts its shape on the way.

    Exactly one line starts with ``error: ``; from there to the end there is no blank line
    (one paragraph), and no traceback anywhere.
    """
    assert "Traceback" not in output, output
    lines = output.rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, f"expected one 'error: ' line:\n{output}"
    paragraph = lines[starts[0]:]
    assert all(line.strip() for line in paragraph), f"the error spans several paragraphs:\n{output}"
    return "\n".join(paragraph)


# -- subprocesses ----------------------------------------------------------------------------

def cli_env(cache: Path, core_only: bool = True) -> dict[str, str]:
    env = dict(os.environ, DISTILLKIT_CACHE=str(cache), PYTHONPATH=str(REPO))
    if core_only:  # the toy example needs no plugin; skipping torchvision saves seconds a process
        env["DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.pop("DISTILLKIT_DEBUG", None)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120, kill_at: str | None = None
            ) -> subprocess.CompletedProcess:
    """``distillkit ARGS`` in a fresh process; with ``kill_at`` it SIGKILLs itself there
    (see ``killpoint.py``)."""
    if kill_at is not None:
        env = dict(env, DISTILLKIT_KILL_AT=kill_at)
        command = KILLPOINT + args
    else:
        command = DISTILLKIT + args
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
