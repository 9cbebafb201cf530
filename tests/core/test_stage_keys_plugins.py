"""Keys that cannot go stale: a CSV cell edited, or a plugin released anew, retrains what it touches.

The data fingerprint of a source covers the bytes of the files its params name; a stage key
covers the name and version of every plugin whose components the stage uses.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.builtin.components import MeanPolicy
from distillkit.config import validate_config
from distillkit.data import DataContext, Dataset, DatasetSource
from distillkit.interfaces import Params
from distillkit.io import FILE_HASHES, file_digests
from distillkit.plugins import PluginManager, hookimpl
from distillkit.runner import Runner, plan


class CsvPointsParams(Params):
    kind: str = "csv_points"
    path: str
    label_column: str = "label"


class CsvPoints(DatasetSource):
    """Four numeric columns and a label per row, as a third-party CSV source would read them;
    it does not override ``fingerprint``."""

    Params = CsvPointsParams

    def load(self) -> Dataset:
        path = Path(self.context.base_dir) / self.params.path
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        n = len(rows)
        return Dataset(inputs=torch.tensor([[float(r[f"x{i}"]) for i in range(4)] for r in rows]),
                       labels={"label": [r[self.params.label_column] for r in rows]},
                       groups=[f"row{i}" for i in range(n)], ids=[f"row{i}" for i in range(n)],
                       pool=np.zeros(n, dtype=bool), source=str(path))


def _plugin(name: str, version: str, **hooks):
    module = types.ModuleType(name)
    module.__version__ = version
    for hook_name, hook in hooks.items():
        setattr(module, hook_name, hookimpl(hook))
    return module


def _data_plugin(version: str):
    def register_datasets(register):
        register("csv_points", CsvPoints)

    return _plugin("house_data", version, register_datasets=register_datasets)


def _policy_plugin(version: str):
    def register_aggregations(register):
        register("houses_mean", MeanPolicy)

    return _plugin("house_policy", version, register_aggregations=register_aggregations)


def _registries(data_version: str = "0.1.0", policy_version: str = "0.1.0"):
    return PluginManager(autoload=False, plugins=[_data_plugin(data_version),
                                                  _policy_plugin(policy_version)]).registries


def _write_points(path: Path, n: int = 80) -> None:
    gen = np.random.default_rng(0)
    lines = ["x0,x1,x2,x3,label"]
    for i in range(n):
        label = i % 2
        x = gen.normal(loc=2.0 * label, scale=0.5, size=4)
        lines.append(",".join(f"{v:.3f}" for v in x) + f",{'ab'[label]}")
    path.write_text("\n".join(lines) + "\n")


def _edit_one_cell(path: Path) -> None:
    """The first row's x0 gets another value of the same length (same file size)."""
    lines = path.read_text().splitlines()
    cells = lines[1].split(",")
    cells[0] = cells[0][:-1] + ("1" if cells[0][-1] != "1" else "2")
    lines[1] = ",".join(cells)
    size = path.stat().st_size
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size == size


def _raw_config(tmp_path: Path) -> dict:
    """The houses run config as YAML would give it: a CSV source and an aggregation of a plugin."""
    return {
        "name": "houses", "seed": 0, "device": "cpu", "cache_dir": str(tmp_path / "cache"),
        "data": {"kind": "csv_points", "path": "points.csv"},
        "tasks": {"label": {"kind": "classification", "hidden": 8}},
        "student": {"kind": "multitask", "encoder": {"kind": "mlp", "in_features": 4, "hidden": 8}},
        "training": {"optimizer": {"kind": "adam", "lr": 0.01}, "batch_size": 16, "epochs": 1},
        "stages": {"m1": {"kind": "train"},
                   "m2": {"kind": "distill", "init": "m1", "teachers": ["m1"], "temperature": 2.0,
                          "aggregation": {"kind": "houses_mean"}}},
    }


def _config(tmp_path: Path, registries):
    return validate_config(_raw_config(tmp_path), registries, file=str(tmp_path / "houses.yaml"), base_dir=tmp_path)


def _independent_fingerprint(params: Params, files: dict[str, Path]) -> str:
    digest = hashlib.sha256(params.model_dump_json().encode())
    for name, path in sorted(files.items()):
        digest.update(f"\0{name}\0{hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()}".encode())
    return digest.hexdigest()[:16]


def test_the_default_fingerprint_covers_the_bytes_of_the_files_the_params_name(tmp_path):
    _write_points(tmp_path / "points.csv")
    params = CsvPointsParams(path="points.csv")
    source = CsvPoints(params, DataContext(cache_dir=tmp_path / "cache", base_dir=tmp_path))
    assert source.data_files() == [("points.csv", (tmp_path / "points.csv").resolve())]
    before = source.fingerprint()
    assert before == _independent_fingerprint(params, {"points.csv": tmp_path / "points.csv"})

    _edit_one_cell(tmp_path / "points.csv")
    after = source.fingerprint()
    assert after != before
    assert after == _independent_fingerprint(params, {"points.csv": tmp_path / "points.csv"})
    # the data beside the cache's own files (``cache_dir: .``): still read, still covered
    beside = CsvPoints(params, DataContext(cache_dir=tmp_path, base_dir=tmp_path))
    assert beside.data_files() == [("points.csv", (tmp_path / "points.csv").resolve())]
    _edit_one_cell(tmp_path / "points.csv")
    assert beside.fingerprint() != after
    assert beside.fingerprint() == _independent_fingerprint(params, {"points.csv": tmp_path / "points.csv"})
    # a source whose params name no file keeps the fingerprint of the params alone
    from distillkit.builtin.toy import ToyBlobs, ToyBlobsParams

    toy = ToyBlobs(ToyBlobsParams(), DataContext(cache_dir=tmp_path / "cache", base_dir=tmp_path))
    assert toy.data_files() == []
    assert toy.fingerprint() == hashlib.sha256(ToyBlobsParams().model_dump_json().encode()).hexdigest()[:16]


class FolderParams(Params):
    kind: str = "folder_points"
    root: str
    options: dict[str, str] = {}


class FolderPoints(CsvPoints):
    Params = FolderParams


def test_a_folder_stands_for_its_files_and_the_config_folder_and_cache_are_never_read(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "1.png").write_bytes(b"one")
    (tmp_path / "images" / "2.png").write_bytes(b"two")
    (tmp_path / "images" / ".hidden").write_bytes(b"skip")
    (tmp_path / "kind").write_bytes(b"a file named like a component")
    cache = tmp_path / "cache"
    cache.mkdir()
    params = FolderParams(root="images", options={"here": ".", "parent": "..", "cache": str(cache), "none": "",
                                                  "also": str(tmp_path / "images" / "2.png")})
    source = FolderPoints(params, DataContext(cache_dir=cache, base_dir=tmp_path))
    assert [name for name, _ in source.data_files()] == sorted(
        ["images/2.png", "images/a/1.png", str(tmp_path / "images" / "2.png")])
    before = source.fingerprint()
    (tmp_path / "images" / "a" / "1.png").write_bytes(b"uno")  # same size
    assert source.fingerprint() != before
    (tmp_path / "images" / "a" / "1.png").rename(tmp_path / "images" / "a" / "3.png")  # renamed: other name
    renamed = source.fingerprint()
    (tmp_path / "images" / "a" / "3.png").rename(tmp_path / "images" / "a" / "1.png")
    assert renamed != source.fingerprint()
    # a folder that holds the data cache is read without it
    inside = FolderPoints(FolderParams(root="."), DataContext(cache_dir=tmp_path / "images" / "a", base_dir=tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    assert [name for name, _ in inside.data_files()] == []  # "." is the config's folder: never read
    holder = FolderPoints(FolderParams(root=str(tmp_path / "images")),
                          DataContext(cache_dir=tmp_path / "images" / "a", base_dir=tmp_path / "cfg"))
    assert [name for name, _ in holder.data_files()] == [f"{tmp_path / 'images'}/2.png"]


def test_file_digests_are_cached_by_size_and_mtime_once_a_file_has_settled(tmp_path):
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_bytes(b"1,2,3")
    new.write_bytes(b"4,5,6")
    settled = time.time_ns() - 60 * 10**9
    os.utime(old, ns=(settled, settled))
    expected = [hashlib.blake2b(b"1,2,3", digest_size=16).hexdigest(),
                hashlib.blake2b(b"4,5,6", digest_size=16).hexdigest()]
    assert file_digests([old, new, tmp_path / "gone.csv"], tmp_path) == expected + ["missing"]
    cached = json.loads((tmp_path / FILE_HASHES).read_text())
    # the settled file is cached; the one written a moment ago is not (it could change again
    # within the file system's mtime granularity, keeping its size and mtime)
    assert cached == {str(old.resolve()): [5, settled, expected[0]]}
    # the cache is read, not the file: same size and mtime are trusted ...
    old.write_bytes(b"7,8,9")
    os.utime(old, ns=(settled, settled))
    assert file_digests([old], tmp_path) == [expected[0]]
    # ... and another mtime re-hashes it
    os.utime(old, ns=(settled + 1, settled + 1))
    assert file_digests([old], tmp_path) == [hashlib.blake2b(b"7,8,9", digest_size=16).hexdigest()]


def test_a_plugin_version_enters_the_keys_of_the_stages_that_use_its_components(tmp_path):
    _write_points(tmp_path / "points.csv")
    base = {p.name: p.key for p in plan(_config(tmp_path, _registries()), _registries(), "fp")}
    assert {p.name: p.key for p in plan(_config(tmp_path, _registries()), _registries(), "fp")} == base

    # the aggregation's plugin is used by m2 only
    bumped = _registries(policy_version="0.1.1")
    keys = {p.name: p.key for p in plan(_config(tmp_path, bumped), bumped, "fp")}
    assert keys["m1"] == base["m1"] and keys["m2"] != base["m2"]

    # the data source's plugin by every stage
    bumped = _registries(data_version="0.2.0")
    keys = {p.name: p.key for p in plan(_config(tmp_path, bumped), bumped, "fp")}
    assert keys["m1"] != base["m1"] and keys["m2"] != base["m2"]


def _stage_keys(run: Path) -> dict[str, str]:
    return {name: json.loads((run / "stages" / name / "stage.json").read_text())["key"] for name in ("m1", "m2")}


@pytest.mark.slow
def test_an_edited_cell_or_a_new_plugin_version_retrains_finished_stages(tmp_path):
    _write_points(tmp_path / "points.csv")
    run = tmp_path / "run"

    def go(registries) -> Runner:
        runner = Runner(_config(tmp_path, registries), registries, run)
        runner.run()
        return runner

    first = go(_registries())
    keys = _stage_keys(run)
    models = {n: (run / "stages" / n / "model.safetensors").stat().st_mtime_ns for n in ("m1", "m2")}

    again = go(_registries())  # nothing changed: both stages are skipped
    assert again.data_fingerprint == first.data_fingerprint and _stage_keys(run) == keys
    assert {n: (run / "stages" / n / "model.safetensors").stat().st_mtime_ns for n in ("m1", "m2")} == models

    _edit_one_cell(tmp_path / "points.csv")
    edited = go(_registries())
    assert edited.data_fingerprint != first.data_fingerprint
    new_keys = _stage_keys(run)
    assert new_keys["m1"] != keys["m1"] and new_keys["m2"] != keys["m2"]
    assert (run / "stages" / ".previous" / "m1" / "model.safetensors").exists()  # the old result, kept aside

    caches = run / "cache" / "teacher_outputs"
    assert len([p for p in caches.iterdir() if p.is_dir()]) == 4  # train and val, before and after the edit
    go(_registries(policy_version="0.1.1"))  # the policy plugin's new release: m2 again, not m1
    last = _stage_keys(run)
    assert last["m1"] == new_keys["m1"] and last["m2"] != new_keys["m2"]
    # m1's weights are the same, yet the teacher outputs are computed again by the new code
    assert len([p for p in caches.iterdir() if p.is_dir()]) == 6


def test_cache_keys_follow_plugin_versions():
    from distillkit import feature_cache, teacher_targets
    from distillkit.data import SplitData
    from distillkit.teacher_targets import TeacherOutputParams

    split = SplitData("train", np.arange(4), torch.zeros(4, 2), {}, {})
    prefix = feature_cache.FrozenPrefix('{"kind": "mlp"}', 1, "abc")
    keys = {feature_cache.cache_key(prefix, split, "data", "fp32", plugins) for plugins in
            (None, {"builtin": "0.1.0"}, {"builtin": "0.1.1"}, {"builtin": "0.1.0", "house_data": "1"})}
    assert len(keys) == 4
    assert feature_cache.cache_key(prefix, split, "data", "fp32", {}) == feature_cache.cache_key(prefix, split, "data", "fp32")
    out = TeacherOutputParams()
    keys = {teacher_targets.cache_key([], {}, {}, True, split, "data", out, "identity", plugins)
            for plugins in (None, {"house_policy": "0.1.0"}, {"house_policy": "0.1.1"})}
    assert len(keys) == 3


@pytest.mark.slow
def test_a_sweep_shares_stages_by_key_and_a_new_plugin_version_trains_only_what_it_touches(tmp_path):
    """The sweep's store is keyed by the stage keys, plugin versions included: two seeds share
    nothing; a second invocation with the aggregation plugin's new release keeps m1 (same key)
    and trains m2 anew under a new key, in the store and in the run folders RunLayout names."""
    import yaml

    from distillkit.rundir import RunLayout
    from distillkit.sweep import load_sweep, run_sweep

    _write_points(tmp_path / "points.csv")
    raw = _raw_config(tmp_path)
    (tmp_path / "houses.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"base": "houses.yaml", "grid": {"seed": [0, 1]}}))
    out = tmp_path / "out"

    def sweep(registries) -> dict:
        return run_sweep(load_sweep(tmp_path / "sweep.yaml", registries), registries, out).summary

    def keys(registries, seed: int) -> dict[str, str]:
        cfg = validate_config(dict(raw, seed=seed), registries, file=str(tmp_path / "houses.yaml"),
                              base_dir=tmp_path)
        runner = Runner(cfg, registries, tmp_path / "probe")
        runner.prepare_data()
        return {p.name: p.key for p in plan(cfg, registries, runner.data_fingerprint)}

    first = sweep(_registries())
    assert first["stages_trained_this_invocation"] == 4
    before = {r["overrides"]["seed"]: r["stages"] for r in first["runs"]}
    assert before == {seed: keys(_registries(), seed) for seed in (0, 1)}

    bumped = _registries(policy_version="0.1.1")
    second = sweep(bumped)
    assert second["stages_trained_this_invocation"] == 2  # m2 of each seed; both m1 are kept
    after = {r["overrides"]["seed"]: r["stages"] for r in second["runs"]}
    assert after == {seed: keys(bumped, seed) for seed in (0, 1)}
    for seed in (0, 1):
        assert after[seed]["m1"] == before[seed]["m1"] and after[seed]["m2"] != before[seed]["m2"]
    # the store holds every stage of both invocations under its key: 2 m1 and 4 m2
    expected = {f"{name}-{key}" for stages in [*before.values(), *after.values()] for name, key in stages.items()}
    assert sorted(p.name for p in (out / "store").iterdir()) == sorted(expected) and len(expected) == 6
    for run in second["runs"]:
        layout = RunLayout(out / run["dir"])
        for name, key in run["stages"].items():
            assert json.loads(layout.stage_marker(name).read_text())["key"] == key
