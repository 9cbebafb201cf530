"""Nothing a user hands distillkit is ever unpickled or imported.

A pickle whose ``__reduce__`` writes a marker file is planted wherever distillkit reads
tensors (a model file given as a teacher, ``load_model``, a checkpoint to resume from, a
teacher-output cache shard); each is refused and the marker never appears. YAML tags that
construct Python objects are refused, and ``kind`` selects only registered components.
"""

from __future__ import annotations

import json
import pickle
import typing
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydantic import BaseModel

from distillkit.checkpoint import file_checksum, load_tensors
from distillkit.cli import cli
from distillkit.config import load_config
from distillkit.errors import DistillkitError
from distillkit.models import load_model
from distillkit.plugins import PluginManager, get_plugin_manager
from distillkit.registry import KINDS
from distillkit.runner import Runner, plan
from tests.robustness.support import dump_yaml, error_paragraph, small_toy


class Payload:
    """Unpickling this writes ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "unpickled!")


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "UNPICKLED"


@pytest.fixture(params=["pickle", "torch.save"])
def evil_bytes(request, marker, tmp_path) -> bytes:
    if request.param == "pickle":
        return pickle.dumps({"weight": Payload(marker)})
    path = tmp_path / "torch-format.bin"
    torch.save({"weight": Payload(marker)}, path)  # the zip format of .pt files
    return path.read_bytes()


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path, fresh_plugin_manager):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.delenv("DISTILLKIT_DEBUG", raising=False)


def test_the_payload_is_live(marker, evil_bytes, tmp_path):
    """The planted files really run code when unpickled, so their refusal below means something."""
    if evil_bytes.startswith(b"PK"):
        (tmp_path / "t.pt").write_bytes(evil_bytes)
        torch.load(tmp_path / "t.pt", weights_only=False)
    else:
        pickle.loads(evil_bytes)
    assert marker.read_text() == "unpickled!"


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_load_model_refuses_a_pickle(marker, evil_bytes, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(evil_bytes)
    with pytest.raises(DistillkitError, match="not a .safetensors file|not a readable safetensors file"):
        load_model(path, get_plugin_manager().registries)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["teacher.safetensors", "teacher.pt"])
def test_a_pickle_given_as_teacher_is_refused_by_the_cli(marker, evil_bytes, tmp_path, name):
    (tmp_path / name).write_bytes(evil_bytes)
    config = small_toy(m2={"extra_teachers": [{"kind": "checkpoint", "path": name}]})
    result = CliRunner().invoke(cli, ["run", str(dump_yaml(tmp_path / "toy.yaml", config)),
                                      "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert f"teacher {name}" in error_paragraph(result.output)
    assert not marker.exists()


def test_a_pickle_planted_as_the_checkpoint_to_resume_from_is_refused(marker, evil_bytes, tmp_path):
    config_path = dump_yaml(tmp_path / "toy.yaml", small_toy())
    registries = get_plugin_manager().registries
    config = load_config(config_path, registries)
    runner = Runner(config, registries, tmp_path / "run")
    runner.prepare_data()
    first = plan(config, registries, runner.data_fingerprint)[0]
    planted = tmp_path / "run" / "stages" / ".work" / f"{first.name}-{first.key}" / "cluster" / "last.safetensors"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(evil_bytes)

    result = CliRunner().invoke(cli, ["run", str(config_path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "last.safetensors is not a readable safetensors file" in error_paragraph(result.output)
    assert not marker.exists()


def test_a_pickle_planted_as_a_cache_shard_is_never_unpickled(marker, evil_bytes, tmp_path):
    from tests.robustness.test_atomic import _build, _files, one_teacher_targets

    online = one_teacher_targets()
    folder = tmp_path / "cache"
    _build(online, folder)
    original = _files(folder)
    shard = folder / "shard-00000.safetensors"
    shard.write_bytes(evil_bytes)
    with pytest.raises(DistillkitError, match="not a readable safetensors file"):
        load_tensors(shard)
    # Even with index.json forged to vouch for the planted file, the shard is refused and rebuilt.
    index = json.loads((folder / "index.json").read_text())
    index["shards"][0]["sha256"] = file_checksum(shard)
    (folder / "index.json").write_text(json.dumps(index))
    _build(online, folder)
    assert _files(folder) == original
    assert not marker.exists()


# -- YAML and kinds ------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", [
    "!!python/object/apply:pathlib.Path.write_text [{path}, 'yaml!']",
    "!!python/object/new:pathlib.PosixPath [{path}]",
    "!!python/name:os.system",
])
def test_yaml_python_tags_are_refused(tmp_path, marker, tag):
    text = (tmp_path / "toy.yaml")
    dump_yaml(text, small_toy())
    text.write_text(text.read_text() + f"name: {tag.format(path=json.dumps(str(marker)))}\n")
    result = CliRunner().invoke(cli, ["validate", str(text)])
    assert result.exit_code == 2
    message = error_paragraph(result.output)
    assert "invalid YAML" in message and "python/" in message
    assert not marker.exists()


def test_a_python_tag_in_a_set_override_is_refused(tmp_path, marker):
    config = dump_yaml(tmp_path / "toy.yaml", small_toy())
    tag = f"name=!!python/object/apply:pathlib.Path.write_text [{json.dumps(str(marker))}, 'set!']"
    result = CliRunner().invoke(cli, ["validate", str(config), "--set", tag])
    assert result.exit_code == 2
    assert "is not valid YAML" in error_paragraph(result.output)
    assert not marker.exists()


@pytest.mark.parametrize("path, value, kind", [
    ("stages.m1.kind", "os.system", "stage"),
    ("student.encoder.kind", "builtins.eval", "encoder"),
    ("data.kind", "distillkit.builtin.toy.ToyBlobs", "dataset"),
    ("tasks.cluster.kind", "distillkit.builtin.classification:ClassificationTask", "task"),
    ("stages.m2.extra_teachers", [{"kind": "subprocess.run", "path": "x"}], "teacher"),
])
def test_kind_selects_only_registered_components(tmp_path, path, value, kind):
    config = small_toy()
    node = config
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    result = CliRunner().invoke(cli, ["validate", str(dump_yaml(tmp_path / "toy.yaml", config))])
    assert result.exit_code == 2
    assert f"unknown {kind} '" in error_paragraph(result.output)


def _fields(model: type[BaseModel], seen: set) -> typing.Iterator[tuple[str, object]]:
    if model in seen:
        return
    seen.add(model)
    for name, info in model.model_fields.items():
        yield f"{model.__name__}.{name}", info.annotation
        for inner in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                yield from _fields(inner, seen)


def test_no_config_field_takes_code():
    """No params model of any registered component has a field that imports or calls:
    pydantic's ImportString, a Callable or a class (``type``)."""
    registries = PluginManager(autoload=True).registries
    seen: set = set()
    checked = 0
    for kind in KINDS:
        for entry in registries.by_kind[kind].entries():
            params = getattr(entry.component, "Params", None)
            if params is None:
                continue
            for where, annotation in _fields(params, seen):
                text = repr(annotation)
                assert "ImportString" not in text and "Callable" not in text, where
                assert typing.get_origin(annotation) is not type and annotation is not type, where
                checked += 1
    assert checked > 50
