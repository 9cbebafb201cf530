"""docs/config.md: generated from the pydantic models, and kept current by this test."""

from __future__ import annotations

import types
from typing import Literal, Optional

from click.testing import CliRunner
from pydantic import Field

from distillkit.cli import cli
from distillkit.config_doc import bundled_registries, config_reference, undocumented_keys
from distillkit.data import DatasetSource
from distillkit.interfaces import Params
from distillkit.plugins import PluginManager, hookimpl, set_plugin_manager
from tests.conftest import REPO


def test_docs_config_md_is_current():
    registries, plugins = bundled_registries()
    expected = config_reference(registries, plugins)
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == expected, ("docs/config.md is out of date: regenerate it with "
                                   "`python -m distillkit.config_doc > docs/config.md`")


def test_every_key_has_a_description():
    registries, _ = bundled_registries()
    assert undocumented_keys(registries) == []


def test_the_reference_shows_type_default_and_doc_of_each_key():
    registries, plugins = bundled_registries()
    text = config_reference(registries, plugins)
    for row in [
        "| `alpha` | float, >= 0, <= 1 | `0.95` | weight of the soft term (the paper: 0.95) |",
        "| `data` | `labeled` \\| `unlabeled` | `labeled` | ``labeled``: CE to the labels plus KL to the teachers "
        "on the training split (M2); ``unlabeled``: KL only, on the unlabeled pool (M3) |",
        "| `models` | list[str], non-empty | required | stages whose models are compared (rows of the table) |",
        "| `encoder` | [encoder](#encoders) | `{kind: mlp}` | the shared encoder (kind: mlp, resnet18, ...) |",
        "| `lr` | float, > 0 | `0.01` | learning rate |",
        "| `vocab_size` | int, >= 1 | `193` | keep the N most frequent training words (the paper: 193); the rest "
        "become <unk> |",
    ]:
        assert row in text, row
    # every registered kind of every family has its section, the eye plugin's too
    for kind in ["toy_blobs", "manifest", "synthetic_fundus", "classification", "caption", "multitask", "mlp",
                 "small_cnn", "resnet50", "efficientnet_lite0", "train", "ensemble", "distill", "evaluate", "kd",
                 "mean", "val_score", "checkpoint", "gaussian_noise", "fundus_jitter"]:
        assert f"### `kind: {kind}`" in text, kind
    assert "`training.optimizer`" in text and "`stages.<name>.teacher_outputs`" in text


class _RatingsParams(Params):
    kind: str = "ratings"
    #: the CSV file with one rating per row
    path: str
    scale: Literal["five", "ten"] = Field("five", description="the rating scale")
    limit: Optional[int] = Field(None, ge=1)


class _Ratings(DatasetSource):
    """Ratings from a CSV file.

    More text that the reference leaves out."""

    Params = _RatingsParams

    def load(self):  # pragma: no cover - never loaded here
        raise NotImplementedError


def _ratings_plugin():
    plugin = types.SimpleNamespace(__name__="ratings_plugin")

    @hookimpl
    def register_datasets(register):
        register("ratings", _Ratings)

    plugin.register_datasets = register_datasets
    return plugin


def test_a_plugins_component_is_documented_from_its_params():
    manager = PluginManager(autoload=False, plugins=[_ratings_plugin()])
    text = config_reference(manager.registries, list(manager.info))
    section = text[text.index("### `kind: ratings`"):]
    section = section[:section.index("\n### ")]
    assert section.splitlines() == [
        "### `kind: ratings`", "",
        "Ratings from a CSV file. (plugin `ratings_plugin`)", "",
        "| key | type | default | description |",
        "| --- | --- | --- | --- |",
        "| `kind` | str | `ratings` | the registered name that selects this component |",
        "| `path` | str | required | the CSV file with one rating per row |",
        "| `scale` | `five` \\| `ten` | `five` | the rating scale |",
        "| `limit` | int \\| null, >= 1 | `null` |  |",
    ]
    assert "pydantic `Params` models of the core and of the plugins (`ratings_plugin`)" in text.replace("\n", " ")
    assert undocumented_keys(manager.registries) == [f"{__name__}._RatingsParams.limit"]


def test_config_doc_command_documents_the_loaded_plugins(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    set_plugin_manager(None)
    try:
        out = tmp_path / "config.md"
        result = CliRunner().invoke(cli, ["config-doc", "--out", str(out)])
        assert result.exit_code == 0, result.output
        core = PluginManager(autoload=False)
        assert out.read_text() == config_reference(core.registries, list(core.info))
        assert "### `kind: toy_blobs`" in out.read_text() and "caption" not in out.read_text()
        printed = CliRunner().invoke(cli, ["config-doc"])
        assert printed.output == out.read_text()
    finally:
        set_plugin_manager(None)
