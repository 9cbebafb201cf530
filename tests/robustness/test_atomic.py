"""Atomic files: a write that dies half-way leaves the previous file whole, and a damaged
teacher-output cache is found and rebuilt with identical content."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch

import distillkit.io
from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MeanParams, MeanPolicy, MLPEncoder, MLPParams, MultiTaskStudent
from distillkit.checkpoint import load_tensors, save_tensors
from distillkit.data import Batch, SplitData
from distillkit.errors import DistillkitError
from distillkit.interfaces import Teacher
from distillkit.io import atomic_write, atomic_write_text, remove_stale_temporaries, write_json
from distillkit.teacher_targets import OnlineTargets, TeacherOutputParams, build_or_load_cache, route_teachers


class Boom(Exception):
    pass


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_that_raises_half_way_keeps_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.9})

    def half_then_crash(tmp):
        tmp.write_text('{"accuracy": 0.')
        raise Boom()

    with pytest.raises(Boom):
        atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"accuracy": 0.9}
    assert _leftovers(tmp_path) == []


def test_a_failing_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.safetensors"
    save_tensors(target, {"w": torch.ones(3)}, {"format": "x", "epoch": 1})
    before = target.read_bytes()

    def replace_fails(src, dst):
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(distillkit.io.os, "replace", replace_fails)
    with pytest.raises(OSError):
        save_tensors(target, {"w": torch.zeros(3)}, {"format": "x", "epoch": 2})
    monkeypatch.undo()
    assert target.read_bytes() == before
    tensors, meta = load_tensors(target)
    assert meta["epoch"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert _leftovers(tmp_path) == []


def test_no_space_left_is_a_user_error_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "good\n")

    def disk_full(tmp):
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DistillkitError, match="no space left on the device while writing .*summary.json"):
        atomic_write(target, disk_full)
    assert target.read_text() == "good\n"
    assert _leftovers(tmp_path) == []


def test_temporaries_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "stages" / ".work" / "m1-abc").mkdir(parents=True)
    stale = [tmp_path / ".metrics.json.k2j4h1.tmp", tmp_path / "stages" / ".work" / "m1-abc" / ".last.safetensors.x9.tmp"]
    kept = [tmp_path / "metrics.json", tmp_path / "notes.tmp", tmp_path / "stages" / ".work" / "m1-abc" / "last.safetensors"]
    for path in stale + kept:
        path.write_text("x")
    assert remove_stale_temporaries(tmp_path) == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


# -- the teacher-output cache ------------------------------------------------------------------

def one_teacher_targets() -> OnlineTargets:
    """Soft targets of one tiny fixed teacher (3 classes) for 4-feature inputs."""
    torch.manual_seed(0)
    tasks = {"a": ClassificationTask("a", ClassificationParams(hidden=0))}
    tasks["a"].fit(["x", "y", "z"])
    model = MultiTaskStudent(MLPEncoder(MLPParams(in_features=4, hidden=6, depth=1)), tasks)
    teacher = Teacher("t", model, frozenset({"a"}), checksum="t")
    routes = route_teachers(["a"], [teacher], MeanPolicy(MeanParams()))
    return OnlineTargets([teacher], tasks, routes, {"a": 2.0}, use_labels=False)


@pytest.fixture
def online():
    return one_teacher_targets()


def _split():
    return SplitData("unlabeled", np.arange(23), torch.randn(23, 4, generator=torch.Generator().manual_seed(1)))


def _build(online, folder):
    params = TeacherOutputParams(storage="fp32", shard_size=8)
    return build_or_load_cache(online, _split(), folder, params, batch_size=4, device=torch.device("cpu"))


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("damage", ["truncate-shard", "delete-index", "truncate-index", "delete-shard"])
def test_a_half_written_cache_is_detected_and_rebuilt_identically(online, tmp_path, monkeypatch, damage):
    folder = tmp_path / "cache"
    split = _split()
    first = _build(online, folder)
    original = _files(folder)
    assert len([n for n in original if n.startswith("shard-")]) == 3  # 23 rows, shards of >= 8
    shard, index = folder / "shard-00001.safetensors", folder / "index.json"
    if damage == "truncate-shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "delete-shard":
        shard.unlink()
    elif damage == "delete-index":
        index.unlink()
    else:
        index.write_bytes(index.read_bytes()[:30])

    calls = []
    real_call = OnlineTargets.__call__
    monkeypatch.setattr(OnlineTargets, "__call__", lambda self, batch: calls.append(1) or real_call(self, batch))
    rebuilt = _build(online, folder)
    assert calls, "the damaged cache was used instead of rebuilt"
    assert _files(folder) == original  # every shard and the index, byte for byte
    batch = Batch(torch.arange(len(split)), split.inputs, None)
    assert torch.equal(rebuilt(batch)["a"]["probs"], first(batch)["a"]["probs"])
