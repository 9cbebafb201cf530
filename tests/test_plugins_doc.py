"""docs/plugins.md: its code examples run as written, and it names every kind and hook.

The fenced ``python`` blocks whose first line is ``# doc-example: <name>`` are executed as
plugin modules, registered through a :class:`PluginManager` and used in small runs.
"""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import pytest
import torch

from conftest import toy_config, write_config
from distillkit.config import load_config
from distillkit.data import DataContext
from distillkit.errors import DistillkitError
from distillkit.models import load_model
from distillkit.plugins import PluginManager
from distillkit.registry import KINDS
from distillkit.runner import Runner

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "plugins.md"
HOOKSPECS = REPO / "distillkit" / "hookspecs.py"


def doc_examples(text: str) -> dict[str, str]:
    """``{name: code}`` of every fenced python block marked ``# doc-example: <name>``."""
    found = {}
    for block in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        first = block.splitlines()[0].strip()
        match = re.fullmatch(r"# doc-example: (\S+)", first)
        if match:
            assert match.group(1) not in found, f"two doc examples named {match.group(1)}"
            found[match.group(1)] = block
    return found


def example_module(name: str) -> types.ModuleType:
    module = types.ModuleType(f"doc_example_{name.replace('-', '_')}")
    exec(compile(doc_examples(DOC.read_text())[name], f"docs/plugins.md:{name}", "exec"), module.__dict__)
    return module


def hookspec_names() -> list[str]:
    tree = ast.parse(HOOKSPECS.read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
            and any(isinstance(d, ast.Name) and d.id == "hookspec" for d in node.decorator_list)]


def missing_mentions(text: str) -> list[str]:
    """Registry kinds without a row in the "Component kinds" table, hookspecs never named."""
    section = text.split("## Component kinds", 1)[1].split("\n## ", 1)[0] if "## Component kinds" in text else ""
    rows = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("|")}
    missing = [kind for kind in KINDS if kind not in rows]
    return missing + [hook for hook in hookspec_names() if not re.search(rf"`{hook}\b", text)]


# -- every kind and hook is documented ----------------------------------------------------------

def test_the_doc_names_every_registry_kind_and_every_hook():
    assert len(KINDS) == 9 and len(hookspec_names()) == 10  # the lists the check walks are complete
    assert missing_mentions(DOC.read_text()) == []


@pytest.mark.parametrize("word", list(KINDS) + hookspec_names())
def test_removing_one_mention_is_caught(word):
    text = DOC.read_text()
    assert re.search(rf"\b{word}\b", text)
    assert missing_mentions(re.sub(rf"\b{word}\b", "", text)) == [word]


# -- the examples -------------------------------------------------------------------------------

def test_the_doc_has_the_three_examples_and_they_import_only_the_public_api():
    examples = doc_examples(DOC.read_text())
    assert {"student", "stage", "teacher-source"} <= set(examples)
    for name, code in examples.items():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distillkit"):
                assert node.module == "distillkit", f"{name} imports from {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("distillkit") for a in node.names), name


def test_examples_register_through_a_plugin_manager():
    modules = [example_module(n) for n in ("student", "stage", "teacher-source")]
    manager = PluginManager(autoload=False, plugins=modules)
    registries = manager.registries
    assert manager.failed == {}
    for module, kind, name, cls in [(modules[0], "student", "linear_student", "LinearStudent"),
                                    (modules[1], "stage", "count_labels", "CountLabels"),
                                    (modules[2], "teacher", "scored_file", "ScoredFile")]:
        entry = registries.by_kind[kind].entry(name)
        assert entry.component is getattr(module, cls)
        assert entry.plugin == module.__name__
        assert manager.info[module.__name__].components == {kind: [name]}


def _config(tmp_path, stages, **extra):
    config = toy_config(student={"kind": "linear_student", "in_features": 8, "width": 12}, stages=stages,
                        cache_dir=str(tmp_path / "cache"), **extra)
    config["data"].update(num_labeled=120, num_unlabeled=30)
    config["training"].update(epochs=2)
    return config


@pytest.fixture(scope="module")
def doc_plugins():
    modules = [example_module(n) for n in ("student", "stage", "teacher-source")]
    return modules, PluginManager(autoload=False, plugins=modules).registries


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, doc_plugins):
    """A run with the student and the stage of the doc: a teacher trained, labels counted."""
    _, registries = doc_plugins
    tmp = tmp_path_factory.mktemp("doc_run")
    path = write_config(tmp, _config(tmp, {"m1": {"kind": "train"},
                                          "count": {"kind": "count_labels", "tasks": ["quadrant"]}}))
    config = load_config(path, registries)
    runner = Runner(config, registries, tmp / "run")
    runner.run()
    return config, runner


def test_student_example_trains_and_reloads_as_its_own_architecture(first_run, doc_plugins):
    modules, registries = doc_plugins
    config, runner = first_run
    record = runner.result("m1").models[0]
    loaded = load_model(runner.run_dir / record.path, registries)
    model = loaded.model
    assert isinstance(model, modules[0].LinearStudent)
    assert isinstance(model.encoder, modules[0].LinearEncoder)
    weight = model.encoder.proj[1].weight
    assert tuple(weight.shape) == (12, 8)
    # The features are the one linear layer, computed by hand.
    x = runner.splits["val"].inputs[:5].float()
    expected = x @ weight.T + model.encoder.proj[1].bias
    assert torch.allclose(model.features(x), expected, atol=1e-6)
    assert set(model.heads) == {"cluster", "quadrant"}


def test_stage_example_counts_the_labeled_rows(first_run, doc_plugins):
    _, registries = doc_plugins
    config, runner = first_run
    counts = runner.result("count").metrics["label_counts"]
    # Independently: the source's raw labels at each split's rows, None meaning missing.
    source = registries.dataset.get("toy_blobs")(config.data, DataContext(cache_dir=runner.cache_dir,
                                                                           base_dir=config.base_dir, where="data"))
    labels = source.load().labels["quadrant"]
    expected = {split: {"quadrant": sum(labels[i] is not None for i in runner.splits[split].indices)}
                for split in ("train", "val", "test")}
    assert counts == expected
    assert 0 < expected["train"]["quadrant"] < len(runner.splits["train"])  # toy_blobs drops 10% of them


def test_stage_example_checks_its_config_and_its_data(tmp_path, doc_plugins):
    _, registries = doc_plugins
    typo = write_config(tmp_path, _config(tmp_path, {"count": {"kind": "count_labels", "splits": ["trian"]}}), "a.yaml")
    with pytest.raises(DistillkitError) as err:
        Runner(load_config(typo, registries), registries, tmp_path / "a").run()
    assert "stages.count.splits: unknown split 'trian'. Did you mean 'train'?" in str(err.value)
    assert not (tmp_path / "cache").exists()  # found before any data was read
    unlabeled = write_config(tmp_path, _config(tmp_path, {"count": {"kind": "count_labels",
                                                                    "splits": ["unlabeled"]}}), "b.yaml")
    with pytest.raises(DistillkitError) as err:
        Runner(load_config(unlabeled, registries), registries, tmp_path / "b").run()
    assert "stages.count.splits: the data has no labeled 'unlabeled' split." in str(err.value)


def test_teacher_source_example_loads_the_model_with_its_scores(first_run, doc_plugins, tmp_path):
    modules, registries = doc_plugins
    config, runner = first_run
    record = runner.result("m1").models[0]
    model_file = runner.run_dir / record.path
    source_cls = registries.teacher.get("scored_file")
    teacher = source_cls(source_cls.Params(path=model_file.name, scores={"cluster": 0.25})).load(
        registries, "cpu", model_file.parent)
    assert teacher.tasks == frozenset({"cluster", "quadrant"})
    assert teacher.scores == {"cluster": 0.25}
    assert teacher.score_directions == {"cluster": "max", "quadrant": "max"}
    assert teacher.checksum == record.checksum
    assert teacher.task_states == {n: t.state() for n, t in runner.tasks.items()}
    x = runner.splits["test"].inputs[:7]
    direct = load_model(model_file, registries).model
    direct.eval()
    assert torch.equal(teacher.features(x), direct.features(x))
    with pytest.raises(DistillkitError, match="has no task price"):
        source_cls(source_cls.Params(path=model_file.name, scores={"price": 1.0})).load(
            registries, "cpu", model_file.parent)

    # In a run: a distill stage taught only by the teacher source.
    path = write_config(tmp_path, _config(tmp_path, {"m2": {
        "kind": "distill", "teachers": [], "temperature": 2.0, "aggregation": {"kind": "val_score"},
        "extra_teachers": [{"kind": "scored_file", "path": str(model_file), "scores": {"cluster": 0.9,
                                                                                       "quadrant": 0.8}}]}}))
    second = Runner(load_config(path, registries), registries, tmp_path / "run2")
    second.run()
    assert second.result("m2").models[0].tasks == ["cluster", "quadrant"]


def test_teacher_source_example_gives_a_regression_score_its_direction(tmp_path, doc_plugins):
    _, registries = doc_plugins
    config = _config(tmp_path, {"m1": {"kind": "train"}},
                     data={"kind": "toy_regression", "num_labeled": 120, "num_unlabeled": 30},
                     tasks={"price": {"kind": "regression", "hidden": 16},
                            "band": {"kind": "classification", "hidden": 16}})
    runner = Runner(load_config(write_config(tmp_path, config), registries), registries, tmp_path / "run")
    runner.run()
    model_file = runner.run_dir / runner.result("m1").models[0].path
    source_cls = registries.teacher.get("scored_file")
    teacher = source_cls(source_cls.Params(path=str(model_file), scores={"price": 3.5})).load(
        registries, "cpu", tmp_path)
    # rmse, the regression task's primary metric, improves downwards
    assert teacher.score_directions == {"price": "min", "band": "max"}
    assert teacher.scores == {"price": 3.5}
