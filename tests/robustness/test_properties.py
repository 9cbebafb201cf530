"""Property-based: whatever a user feeds the config and manifest readers, the answer is a
result or a DistillkitError (a one-paragraph message), never another exception."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distillkit.config import RunConfig, load_config, validate_config
from distillkit.errors import DistillkitError
from distillkit.plugins import PluginManager
from distillkit.runner import plan
from eye_fundus.manifest import ManifestColumns, ManifestRows, read_manifest
from tests.robustness.support import image_config, small_toy

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def registries():
    return PluginManager(autoload=True).registries


# YAML gives keys and values of these types
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=12)
keys = st.text(max_size=10) | st.integers(-3, 3) | st.booleans() | st.none()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=20)
#: words that mean something in a config, so random trees reach past the first checks
config_words = st.sampled_from(["kind", "tasks", "stages", "data", "student", "training", "split", "encoder",
                                "teachers", "init", "temperature", "alpha", "train", "distill", "ensemble",
                                "evaluate", "classification", "caption", "mlp", "toy_blobs", "manifest", "m1",
                                "cluster", "quadrant", "subsets", "models", "extra_teachers", "checkpoint",
                                "path", "early_stopping", "metric", "optimizer", "lr", "epochs"])
mixed_values = st.recursive(scalars | config_words,
                            lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(config_words | keys, inner, max_size=5), max_leaves=25)


def _validate_and_plan(data, registries) -> None:
    try:
        config = validate_config(data, registries, file="random.yaml")
    except DistillkitError as exc:
        assert exc.render().strip()
        return
    assert isinstance(config, RunConfig)
    try:
        plan(config, registries)  # what `distillkit validate` does next
    except DistillkitError:
        pass


@SETTINGS
@given(st.dictionaries(keys | config_words, values, max_size=6))
def test_validate_config_on_random_trees(registries, data):
    _validate_and_plan(data, registries)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


BASES = [small_toy(), image_config()]
BASE_PATHS = [list(_paths(base))[1:] for base in BASES]


@SETTINGS
@given(st.data())
def test_validate_config_on_mutated_good_configs(registries, data):
    """A good config with a few values replaced, deleted or nested deeper."""
    which = data.draw(st.integers(0, len(BASES) - 1))
    config = copy.deepcopy(BASES[which])
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(BASE_PATHS[which]))
        node = config
        try:
            for part in path[:-1]:
                node = node[part]
            action = data.draw(st.sampled_from(["replace", "delete"]))
            if action == "delete" and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = data.draw(mixed_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    _validate_and_plan(config, registries)


yaml_text = st.text(alphabet=st.sampled_from(list("abcdekmstnl0123456789.:-_[]{},!&*|>'\"#% \n\t\\?@`")),
                    max_size=200)


def _yaml_of_mutations(data) -> str:
    return yaml.safe_dump(data, sort_keys=False)


@SETTINGS
@given(st.one_of(yaml_text, st.text(max_size=200), st.binary(max_size=200),
                 st.dictionaries(config_words, mixed_values, max_size=6).map(_yaml_of_mutations)))
def test_load_config_on_random_files(registries, content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        try:
            config = load_config(path, registries)
        except DistillkitError as exc:
            assert exc.render().strip()
        else:
            assert isinstance(config, RunConfig)


cells = st.text(alphabet=st.sampled_from(list("ab,\"\n\r x1/.é\x00;\t")), max_size=8)
csv_rows = st.lists(st.lists(cells, max_size=6), max_size=6)
HEADER = "image,patient_id,broad_label,fine_label,diagnosis_text,suggested_split"


def _csv(rows, header: bool) -> bytes:
    lines = [HEADER] if header else []
    lines += [",".join(row) for row in rows]
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@SETTINGS
@given(st.one_of(st.binary(max_size=300), st.builds(_csv, csv_rows, st.booleans())),
       st.sampled_from([None, ManifestColumns(split="suggested_split"),
                        ManifestColumns(split="suggested_split", include_splits=["train"]),
                        ManifestColumns(patient_id=None, fields={"broad_label": "broad_label"})]))
def test_read_manifest_on_random_bytes(content, columns):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "manifest.csv"
        path.write_bytes(content)
        try:
            rows = read_manifest(path, columns)
        except DistillkitError as exc:
            assert exc.render().strip()
        else:
            assert isinstance(rows, ManifestRows) and len(rows) > 0
            assert len(rows.images) == len(rows.groups) == len(rows.pool) == len(rows.lines)
