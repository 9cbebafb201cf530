"""The bad-inputs catalogue: every user mistake ends the same way.

Each case goes through the CLI (``distillkit run ... --out DIR``) and must exit with status 2
and ONE paragraph that starts with ``error: ``, names the file, field or row, and shows no
traceback. ``--out`` points at a copy of a finished run: a failed run must leave every file
there byte-identical (it may only add in-progress state under ``stages/.work/``).

A few inputs are not errors by decision (see docs/errors.md): grayscale and 16-bit images are
converted, a label outside the training class list counts as missing, captions longer than
the limit are truncated, and patients spread over two suggested splits are accepted; each
gives one counted warning and exit status 0.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distillkit.cli import cli
from distillkit.plugins import set_plugin_manager
from tests.robustness.support import (assert_untouched, copy_run, dump_yaml, error_paragraph, image_config,
                                      image_dataset, save_png, small_toy, snapshot)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A finished run of the small toy config: the 'earlier good results'."""
    folder = tmp_path_factory.mktemp("good")
    config = dump_yaml(folder / "toy.yaml", small_toy())
    set_plugin_manager(None)
    try:
        result = CliRunner().invoke(cli, ["run", str(config), "--out", str(folder / "run"), "--quiet"])
    finally:
        set_plugin_manager(None)
    assert result.exit_code == 0, result.output
    return folder / "run"


@dataclass
class Workspace:
    """What a case builds its inputs in: ``root`` (a tmp folder) and the CLI arguments."""

    root: Path
    out: Path
    monkeypatch: pytest.MonkeyPatch
    extra_args: list[str] = field(default_factory=list)

    def toy(self, edit: Callable[[dict], None] | None = None, name: str = "toy.yaml") -> Path:
        config = small_toy()
        if edit is not None:
            edit(config)
        return dump_yaml(self.root / name, config)

    def images(self, edit: Callable[[dict], None] | None = None, rows=(), n: int = 20, **kw) -> Path:
        image_dataset(self.root, n=n, rows=rows, **kw)
        config = image_config()
        if edit is not None:
            edit(config)
        return dump_yaml(self.root / "images.yaml", config)

    def text(self, content: str | bytes, name: str = "config.yaml") -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path


@dataclass
class Case:
    id: str
    #: builds the inputs; returns the config path
    make: Callable[[Workspace], Path]
    #: substrings of the error paragraph (or, with ``warning``, of the log)
    expect: tuple[str, ...]
    #: not an error by decision: exit 0 and this counted warning
    warning: bool = False
    args: tuple[str, ...] = ()


def _set(path: str, value):
    """An edit that sets ``a.b.c`` in a config dict."""
    def edit(config: dict) -> None:
        node = config
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return edit


def _toy(path: str, value) -> Callable[[Workspace], Path]:
    return lambda ws: ws.toy(_set(path, value))


def _images(edit=None, rows=(), **kw) -> Callable[[Workspace], Path]:
    return lambda ws: ws.images(edit, rows=rows, **kw)


# -- image inputs -----------------------------------------------------------------------------

def _with_image(writer: Callable[[Path], None], name: str) -> Callable[[Workspace], Path]:
    """20 good images plus a 21st row whose file ``writer`` produces (or not)."""
    def make(ws: Workspace) -> Path:
        config = ws.images(rows=[f"images/{name},p20,a,fine a,text a"])
        writer(ws.root / "images" / name)
        return config
    return make


def _truncated(suffix: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        save_png(path.with_suffix(suffix), 99)
        data = path.with_suffix(suffix).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return write


def _converted(mode: str) -> Callable[[Workspace], Path]:
    def make(ws: Workspace) -> Path:
        config = ws.images()
        save_png(ws.root / "images" / "3.png", 3, mode=mode)
        return config
    return make


def _patient_in_test() -> str:
    """A patient id that the default split puts in the test split next to p0 .. p19."""
    from distillkit.data import Dataset, SplitParams, split_indices

    for k in range(200):
        name = f"p{k % 20}{'abcdefghij'[k // 20]}"  # sorts in among p0 .. p19, at a different place each
        groups = [f"p{i}" for i in range(20)] + [name]
        data = Dataset(torch.zeros(21, 1), {}, groups, groups, np.zeros(21, bool))
        if 20 in split_indices(data, SplitParams())["test"]:
            return name
    raise AssertionError("no test patient found")


def _unknown_label(policy: str | None) -> Callable[[Workspace], Path]:
    def make(ws: Workspace) -> Path:
        patient = _patient_in_test()
        save_png(ws.root / "images" / "extra.png", 50)
        edit = _set("tasks.broad.unknown_labels", policy) if policy else None
        return ws.images(edit, rows=[f"images/extra.png,{patient},zebra,fine a,text a"])
    return make


def _two_suggested_splits(ws: Workspace) -> Path:
    save_png(ws.root / "images" / "extra.png", 50)
    return ws.images(_set("data.split_column", "suggested_split"), extra_column="suggested_split",
                     rows=["images/extra.png,p3,b,fine b,text b,test"])


def _long_caption(ws: Workspace) -> Path:
    long_text = " ".join(f"word{i}" for i in range(30))

    def edit(config: dict) -> None:
        config["tasks"]["text"] = {"kind": "caption", "field": "diagnosis_text", "max_length": 5,
                                   "embedding_dim": 8, "hidden_dim": 8}
    save_png(ws.root / "images" / "extra.png", 50)
    return ws.images(edit, rows=[f"images/extra.png,p20,a,fine a,{long_text}"])


def _non_utf8_manifest(ws: Workspace) -> Path:
    config = ws.images()
    manifest = ws.root / "manifest.csv"
    manifest.write_bytes(manifest.read_bytes() + "images/0.png,p0,caf\u00e9,x,y\n".encode("latin-1"))
    return config


def _manifest_missing_column(ws: Workspace) -> Path:
    return ws.images(header="image,patient_id,broad,fine_label,diagnosis_text")


# -- checkpoints as teachers ------------------------------------------------------------------

def _checkpoint(ws: Workspace, task_classes: dict[str, list[str]], name: str) -> Path:
    """A genuine distillkit model file over the toy's 8 inputs, for tasks of our choosing."""
    from distillkit.builtin.classification import ClassificationParams, ClassificationTask
    from distillkit.builtin.components import MLPEncoder, MLPParams, MultiTaskParams, MultiTaskStudent
    from distillkit.checkpoint import save_model
    from distillkit.models import model_meta

    tasks = {}
    for task, classes in task_classes.items():
        tasks[task] = ClassificationTask(task, ClassificationParams(hidden=32))
        tasks[task].fit(classes)
    encoder = MLPParams(in_features=8, hidden=64)
    model = MultiTaskStudent(MLPEncoder(encoder), tasks)
    path = ws.root / name
    save_model(path, model, model_meta(MultiTaskParams(encoder=encoder), tasks, "outside"))
    return path


def _teacher_file(write: Callable[[Workspace], Path], only_extra: bool = False) -> Callable[[Workspace], Path]:
    def make(ws: Workspace) -> Path:
        path = write(ws)

        def edit(config: dict) -> None:
            config["stages"]["m2"]["extra_teachers"] = [{"kind": "checkpoint", "path": str(path.name)}]
            if only_extra:
                config["stages"]["m2"]["teachers"] = []
        return ws.toy(edit)
    return make


def _garbage(name: str, data: bytes) -> Callable[[Workspace], Path]:
    def write(ws: Workspace) -> Path:
        (ws.root / name).write_bytes(data)
        return ws.root / name
    return write


def _foreign_safetensors(ws: Workspace) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(ws.root / "foreign.safetensors"))
    return ws.root / "foreign.safetensors"


# -- faults during a run ----------------------------------------------------------------------

def _no_space(ws: Workspace) -> Path:
    """ENOSPC from fsync (where delayed allocation reports it) for files under stages/."""
    import distillkit.io

    real_fsync = os.fsync
    stages = str(ws.out / "stages")

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(stages):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    ws.monkeypatch.setattr(distillkit.io.os, "fsync", fsync)
    ws.extra_args += ["--set", "stages.m3.temperature=3"]  # only m3 and the report run again
    return ws.toy()


def _nan_in_epoch_1(ws: Workspace) -> Path:
    """Inputs turn NaN from the second step of the second epoch (m3 only runs again)."""
    import distillkit.training
    from distillkit.data import Batch

    real = distillkit.training.iterate_batches

    def iterate(split, batch_size, **kw):
        for step, batch in enumerate(real(split, batch_size, **kw)):
            if kw.get("shuffle") and kw.get("epoch") == 1 and step >= 1:
                batch = Batch(batch.index, batch.inputs * float("nan"), batch.targets)
            yield batch
    ws.monkeypatch.setattr(distillkit.training, "iterate_batches", iterate)
    ws.extra_args += ["--set", "stages.m3.temperature=3"]
    return ws.toy()


def _weights_overflow_at_end_of_epoch_1(ws: Workspace) -> Path:
    """The last update of m3's second epoch leaves an infinite weight while every loss of the
    epoch was finite: that epoch must not be saved as the last good checkpoint."""
    import distillkit.training

    real_iterate, real_optimizer = distillkit.training.iterate_batches, distillkit.training.make_optimizer
    poison = {"next_step": False}

    def iterate(split, batch_size, **kw):
        batches = list(real_iterate(split, batch_size, **kw))
        for step, batch in enumerate(batches):
            poison["next_step"] = bool(kw.get("shuffle")) and kw.get("epoch") == 1 and step == len(batches) - 1
            yield batch

    def make_optimizer(model, params):
        optimizer = real_optimizer(model, params)
        real_step = optimizer.step

        def step(*args, **kwargs):
            result = real_step(*args, **kwargs)
            if poison["next_step"]:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("inf")
            return result
        optimizer.step = step
        return optimizer

    ws.monkeypatch.setattr(distillkit.training, "iterate_batches", iterate)
    ws.monkeypatch.setattr(distillkit.training, "make_optimizer", make_optimizer)
    ws.extra_args += ["--set", "stages.m3.temperature=3"]
    return ws.toy()


def _out_is_file(ws: Workspace) -> Path:
    ws.out = ws.root / "results.txt"
    ws.out.write_text("not a folder")
    return ws.toy()


def _cycle(config: dict) -> None:
    config["stages"]["m1"]["init"] = "m3"


def _non_utf8_yaml(ws: Workspace) -> Path:
    return ws.text(ws.toy().read_text().replace("name: toy", "name: caf\u00e9").encode("latin-1"))


CASES = [
    # -- the config file ----------------------------------------------------------------------
    Case("malformed-yaml", lambda ws: ws.text("name: toy\nstages: [m1, {kind: train\n"),
         ("config.yaml:", "invalid YAML")),
    Case("yaml-not-a-mapping", lambda ws: ws.text("- just\n- a list\n"),
         ("config.yaml", "must be a mapping")),
    Case("non-utf8-yaml", _non_utf8_yaml, ("config.yaml", "not UTF-8")),
    Case("missing-config", lambda ws: ws.root / "nowhere.yaml", ("nowhere.yaml does not exist",)),
    Case("unknown-top-level-key", lambda ws: ws.toy(_set("trainig", {"epochs": 2})),
         ("toy.yaml", "unknown top-level key 'trainig'", "Did you mean 'training'?")),
    Case("unknown-encoder", _toy("student.encoder.kind", "mpl"),
         ("toy.yaml", "student.encoder.kind", "unknown encoder 'mpl'", "Did you mean 'mlp'?")),
    Case("unknown-stage-kind", _toy("stages.m3.kind", "distil"),
         ("stages.m3.kind", "unknown stage 'distil'", "Did you mean 'distill'?")),
    Case("unknown-key-in-component", _toy("training.optimizer.lrate", 0.1),
         ("training.optimizer.lrate", "unknown key 'lrate'", "Did you mean 'lr'?")),
    Case("wrong-type", _toy("training.epochs", "three"),
         ("training.epochs (line", "valid integer", "'three'")),
    Case("negative-temperature", _toy("stages.m2.temperature", -2.0),
         ("stages.m2.temperature", "temperatures must be > 0")),
    Case("zero-temperature-for-one-task", _toy("stages.m3.temperature", {"cluster": 0.0}),
         ("stages.m3.temperature", "temperatures must be > 0")),
    Case("misspelt-temperature-task", _toy("stages.m3.temperature", {"clustr": 5.0}),
         ("toy.yaml", "stages.m3.temperature.clustr", "not a task of this stage", "Did you mean 'cluster'?")),
    Case("alpha-above-1", _toy("stages.m2.alpha", 1.5), ("stages.m2.alpha", "less than or equal to 1")),
    Case("alpha-negative", _toy("stages.m2.alpha", -0.1), ("stages.m2.alpha", "greater than or equal to 0")),
    Case("train-fraction-zero", _toy("split.train_fraction", 0), ("split.train_fraction", "greater than 0")),
    Case("train-fraction-as-percent", _toy("split.train_fraction", 70),
         ("split.train_fraction", "fraction", "0.7")),
    Case("split-fractions-over-1", _toy("split.val", 0.6), ("split", "exceeds 1")),
    Case("unknown-task-in-stage", _toy("stages.m1.tasks", ["clustr"]),
         ("stages.m1.tasks", "unknown task 'clustr'", "Did you mean 'cluster'?")),
    Case("stage-cycle", lambda ws: ws.toy(_cycle), ("cycle", "m1 -> m3 -> m2 -> m1")),
    Case("missing-dependency", _toy("stages.m3.teachers", ["m9"]),
         ("stages.m3", "refers to stage 'm9', which does not exist")),
    Case("set-without-equals", lambda ws: ws.toy(), ("--set", "must look like key.path=value"),
         args=("--set", "training.epochs")),
    Case("set-through-a-scalar", lambda ws: ws.toy(), ("--set", "'seed' is not a mapping"),
         args=("--set", "seed.value=1")),
    Case("cuda-without-cuda", _toy("device", "cuda"), ("device", "CUDA is not available")),
    Case("out-is-a-file", _out_is_file, ("--out", "results.txt is a file")),
    Case("freeze-point-names-no-block", _toy("student.encoder.freeze", {"until": "layer3"}),
         ("toy.yaml: student.encoder.freeze.until", "'layer3' is not a block of the mlp encoder",
          "Did you mean 'layer2'?", "Blocks, in order: layer1, layer2.")),
    Case("encoder-width-not-the-datas", _toy("student.encoder.in_features", 3),
         ("toy.yaml: invalid stages:\n  - student: the student (multitask with encoder mlp) cannot read this data's "
          "inputs (one row: 8, float32): mat1 and mat2 shapes cannot be multiplied", "student.encoder.in_features")),
    Case("early-stopping-metric-misspelt", _toy("training.early_stopping.metric", "val_los"),
         ("toy.yaml: invalid stages:\n  - training.early_stopping.metric: 'val_los' must be val_loss", "val_loss")),
    Case("stage-early-stopping-metric-misspelt", _toy("stages.m1.training", {"early_stopping": {"metric": "val_los"}}),
         ("stages.m1.training.early_stopping.metric", "'val_los'", "val_loss")),
    # -- the manifest and its images -------------------------------------------------------------
    Case("missing-manifest", lambda ws: dump_yaml(ws.root / "images.yaml", image_config("nowhere.csv")),
         ("data.path", "nowhere.csv")),
    Case("manifest-missing-column", _manifest_missing_column,
         ("manifest.csv:line 1", "column 'broad_label'", "Did you mean 'broad'?")),
    Case("manifest-row-with-extra-field", _images(rows=["images/0.png,p0,a,x,y,extra"]),
         ("manifest.csv:line 22", "6 fields but the header has 5")),
    Case("non-utf8-manifest", _non_utf8_manifest, ("manifest.csv:line 22", "not valid UTF-8")),
    Case("duplicate-image", _images(rows=["images/4.png,p4,a,x,y"]),
         ("manifest.csv:line 22", "'images/4.png' is listed twice", "line 6")),
    Case("missing-image", _with_image(lambda path: None, "gone.png"),
         ("manifest.csv:line 22", "image file not found", "gone.png")),
    Case("corrupt-jpeg", _with_image(lambda path: path.write_bytes(b"\xff\xd8\xff" + os.urandom(200)), "bad.jpg"),
         ("manifest.csv:line 22", "cannot read image", "bad.jpg")),
    Case("truncated-jpeg", _with_image(_truncated(".full.jpg"), "cut.jpg"),
         ("manifest.csv:line 22", "cannot read image", "cut.jpg")),
    Case("truncated-png", _with_image(_truncated(".full.png"), "cut.png"),
         ("manifest.csv:line 22", "cannot read image", "cut.png")),
    Case("empty-image-file", _with_image(lambda path: path.write_bytes(b""), "empty.png"),
         ("manifest.csv:line 22", "cannot read image", "empty.png")),
    Case("every-image-unreadable", _images(_set("data.on_bad_image", "skip"), n=0,
                                           rows=["images/none1.png,p1,a,x,y", "images/none2.png,p2,b,x,y"]),
         ("manifest.csv", "none of the manifest's images can be read")),
    Case("empty-after-include-splits",
         _images(lambda c: c["data"].update(split_column="suggested_split", include_splits=["validation"]),
                 extra_column="suggested_split"),
         ("manifest.csv", "no row is left", "validation")),
    Case("split-empty-too-few-patients", _images(n=2), ("manifest.csv", "split is empty")),
    Case("label-not-in-class-list-as-error", _unknown_label("error"),
         ("manifest.csv (test split)", "label 'zebra'", "not in the training class list")),
    # -- checkpoints given as teachers -------------------------------------------------------------
    Case("teacher-checkpoint-missing", _teacher_file(lambda ws: ws.root / "gone.safetensors"),
         ("teacher gone.safetensors", "does not exist")),
    Case("teacher-checkpoint-garbage", _teacher_file(_garbage("noise.safetensors", os.urandom(64))),
         ("teacher noise.safetensors", "not a readable safetensors file")),
    Case("teacher-checkpoint-foreign", _teacher_file(_foreign_safetensors),
         ("teacher foreign.safetensors", "not a distillkit checkpoint")),
    Case("teacher-checkpoint-pickle", _teacher_file(_garbage("model.pt", pickle.dumps({"weights": [1, 2]}))),
         ("teacher model.pt", "not a .safetensors file", "never opened")),
    Case("teacher-from-other-task-set",
         _teacher_file(lambda ws: _checkpoint(ws, {"severity": ["low", "high"]}, "other.safetensors"), only_extra=True),
         ("stages.m2.teachers", "no teacher learned task 'cluster'", "severity")),
    Case("teacher-with-other-class-list",
         _teacher_file(lambda ws: _checkpoint(ws, {"cluster": ["c0", "c1", "c2"], "quadrant": ["q0", "q1", "q2", "q3"]},
                                              "three.safetensors")),
         ("stages.m2", "teacher 'three' learned task 'cluster' from other labels", "classes: 3 entries")),
    # -- faults during a run -----------------------------------------------------------------------
    Case("no-space-left", _no_space, ("no space left on the device", "stages/.work/m3-", "earlier files are intact")),
    Case("nan-loss-from-huge-lr", lambda ws: ws.toy(),
         ("stage 'teachers'", "NaN or infinite", "epoch 0, step", "none yet"),
         args=("--set", "training.optimizer.lr=1e30")),
    Case("nan-loss-keeps-last-checkpoint", _nan_in_epoch_1,
         ("stage 'm3'", "NaN or infinite", "epoch 1, step 1", "last good checkpoint (last.safetensors) was kept")),
    Case("weights-overflow-keeps-last-checkpoint", _weights_overflow_at_end_of_epoch_1,
         ("stage 'm3'", "weights became NaN or infinite", "epoch 1, step", "(last.safetensors) was kept")),
    # -- accepted with a counted warning (exit 0) --------------------------------------------------
    Case("grayscale-image", _converted("L"), ("1 of 20 images were grayscale (L)", "converted to 8-bit RGB"),
         warning=True),
    Case("16-bit-image", _converted("I;16"), ("1 of 20 images were 16-bit grayscale (I;16)",), warning=True),
    Case("label-not-in-class-list", _unknown_label(None),
         ("test split", "1 label of task 'broad'", "'zebra'", "scored as wrong"), warning=True),
    Case("caption-longer-than-limit", _long_caption,
         ("1 of", "captions of task 'text'", "longer than 5 words", "truncated"), warning=True),
    Case("patient-in-two-suggested-splits", _two_suggested_splits,
         ("1 patient", "more than one suggested split", "'p3'"), warning=True),
]


def test_the_catalogue_is_complete():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, good_run, tmp_path, monkeypatch, fresh_plugin_manager, caplog):
    if case.id == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTILLKIT_DEBUG", raising=False)
    root = tmp_path / "inputs"
    root.mkdir()
    out = tmp_path / "run" if case.warning else copy_run(good_run, tmp_path / "run")
    ws = Workspace(root, out, monkeypatch)
    config = case.make(ws)
    before = snapshot(ws.out) if ws.out.is_dir() else None
    caplog.set_level(logging.WARNING)

    result = CliRunner().invoke(cli, ["run", str(config), "--out", str(ws.out), "--quiet",
                                      *case.args, *ws.extra_args])

    if case.warning:
        assert result.exit_code == 0, result.output
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        matching = [w for w in warnings if all(part in w for part in case.expect)]
        assert len(matching) == 1, f"expected one warning with {case.expect}, got {warnings}"
        return
    assert result.exit_code == 2, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
    message = error_paragraph(result.output)
    for part in case.expect:
        assert part in message, f"{part!r} not in:\n{message}"
    if before is not None:
        assert_untouched(before, ws.out)
    elif ws.out.exists() and ws.out.is_file():
        assert ws.out.read_text() == "not a folder"


@pytest.mark.parametrize("fault", [_nan_in_epoch_1, _weights_overflow_at_end_of_epoch_1])
def test_nan_stop_keeps_a_loadable_checkpoint_of_the_last_good_epoch(good_run, tmp_path, monkeypatch,
                                                                      fresh_plugin_manager, fault):
    from distillkit.checkpoint import STATE_FORMAT, load_tensors

    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    out = copy_run(good_run, tmp_path / "run")
    ws = Workspace(tmp_path, out, monkeypatch)
    config = fault(ws)
    result = CliRunner().invoke(cli, ["run", str(config), "--out", str(out), "--quiet", *ws.extra_args])
    assert result.exit_code == 2
    [last] = out.glob("stages/.work/m3-*/last.safetensors")
    tensors, meta = load_tensors(last, STATE_FORMAT)
    assert meta["loop"]["epoch"] == 1  # epoch 0 finished; epoch 1 never saved
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))
