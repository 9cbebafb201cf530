"""Registries and plugin discovery."""

from __future__ import annotations

import types
from importlib import metadata

import pytest

from distillkit.errors import DistillkitError
from distillkit.plugins import PluginManager, hookimpl
from distillkit.registry import Registry


def test_duplicate_name_names_both_plugins():
    reg = Registry("task")
    reg.register("broad", object, plugin="first")
    with pytest.raises(DistillkitError) as err:
        reg.register("broad", object, plugin="second")
    assert "'first'" in str(err.value) and "'second'" in str(err.value)


def test_unknown_name_lists_known_and_suggests_closest():
    reg = Registry("encoder")
    for name in ("resnet18", "resnet50", "small_cnn"):
        reg.register(name, object, plugin="p")
    with pytest.raises(DistillkitError) as err:
        reg.get("resnet5O")
    text = str(err.value)
    assert "Did you mean 'resnet50'?" in text
    assert "resnet18, resnet50, small_cnn" in text


def _make_plugin_module(name: str, hook_name: str = "register_tasks"):
    module = types.ModuleType(name)

    def hook(register):
        from distillkit.builtin.classification import ClassificationTask

        register("my_task", ClassificationTask)

    hook.__name__ = hook_name
    setattr(module, hook_name, hookimpl(hook))
    module.__version__ = "9.9"
    return module


class _FakeEntryPoint:
    def __init__(self, name, value, module):
        self.name, self.value, self.group = name, value, "distillkit"
        self._module = module
        self.dist = types.SimpleNamespace(version="1.2.3")

    def load(self):
        if self._module is None:
            raise ImportError("No module named 'missing_dependency'")
        return self._module


def _fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr("distillkit.plugins.metadata.entry_points",
                        lambda group=None: [e for e in eps if group in (None, "distillkit")])


def test_entry_point_plugin_is_discovered_and_registered(monkeypatch):
    module = _make_plugin_module("my_plugin")
    _fake_entry_points(monkeypatch, [_FakeEntryPoint("my_plugin", "my_plugin", module)])
    pm = PluginManager(autoload=True)
    assert "my_task" in pm.registries.task
    assert pm.registries.task.entry("my_task").plugin == "my_plugin"
    assert pm.info["my_plugin"].version == "1.2.3"
    assert pm.info["my_plugin"].components["task"] == ["my_task"]
    # built-ins come through the same hooks
    assert pm.registries.task.entry("classification").plugin == "builtin"


def test_autoload_can_be_turned_off_by_environment(monkeypatch):
    module = _make_plugin_module("my_plugin")
    _fake_entry_points(monkeypatch, [_FakeEntryPoint("my_plugin", "my_plugin", module)])
    monkeypatch.setenv("DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = PluginManager()
    assert "my_task" not in pm.registries.task
    assert "classification" in pm.registries.task


def test_misspelt_hook_fails_loudly():
    module = _make_plugin_module("typo_plugin", hook_name="register_task")
    with pytest.raises(DistillkitError, match="unknown hook"):
        PluginManager(autoload=False, plugins=[module])


def test_broken_plugin_is_reported_and_others_still_load(monkeypatch):
    good = _make_plugin_module("good_plugin")
    _fake_entry_points(monkeypatch, [_FakeEntryPoint("broken", "broken.plugin", None),
                                     _FakeEntryPoint("good_plugin", "good_plugin", good)])
    pm = PluginManager(autoload=True)
    assert "my_task" in pm.registries.task
    assert "missing_dependency" in pm.failed["broken"]


def test_duplicate_component_across_plugins_is_an_error():
    a = _make_plugin_module("plugin_a")
    b = _make_plugin_module("plugin_b")
    pm = PluginManager(autoload=False, plugins=[a, b])
    with pytest.raises(DistillkitError) as err:
        pm.registries
    assert "plugin_a" in str(err.value) and "plugin_b" in str(err.value)


def test_plugin_can_add_a_cli_command():
    import click

    module = types.ModuleType("cmd_plugin")

    @hookimpl
    def register_commands(cli):
        @cli.command("hello")
        def hello():
            click.echo("hi")

    module.register_commands = register_commands
    pm = PluginManager(autoload=False, plugins=[module])
    group = click.Group()
    pm.add_commands(group)
    assert "hello" in group.commands


def test_real_entry_point_of_the_installed_distribution():
    """The installed distribution declares the eye plugin in the 'distillkit' group."""
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="distillkit")}
    assert eps.get("eye_fundus") == "eye_fundus.plugin"
