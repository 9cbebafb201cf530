"""Registries and plugin discovery."""

from __future__ import annotations

import logging
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


def test_misspelt_hook_makes_only_its_plugin_unavailable(monkeypatch, caplog):
    typo = _make_plugin_module("typo_plugin", hook_name="register_task")
    good = _make_plugin_module("good_plugin")
    _fake_entry_points(monkeypatch, [_FakeEntryPoint("typo_plugin", "typo_plugin", typo),
                                     _FakeEntryPoint("good_plugin", "good_plugin", good)])
    with caplog.at_level(logging.WARNING, logger="distillkit.plugins"):
        pm = PluginManager(autoload=True)
    message = pm.failed["typo_plugin"]
    assert "plugin 'typo_plugin' is unavailable" in message
    assert "unknown hook 'register_task'" in message and "Did you mean 'register_tasks'?" in message
    assert "typo_plugin" not in pm.info and pm.pm.get_plugin("typo_plugin") is None
    # the other plugin and the core keep working, and the failure is reported once
    assert pm.registries.task.entry("my_task").plugin == "good_plugin"
    assert "classification" in pm.registries.task
    assert [r.getMessage() for r in caplog.records] == [message]


def test_misspelt_hook_passed_explicitly_is_reported_the_same_way():
    module = _make_plugin_module("typo_plugin", hook_name="register_stage")
    pm = PluginManager(autoload=False, plugins=[module])
    assert "unknown hook 'register_stage'" in pm.failed["typo_plugin"]
    assert "Did you mean 'register_stages'?" in pm.failed["typo_plugin"]


def test_broken_plugin_is_reported_and_others_still_load(monkeypatch):
    good = _make_plugin_module("good_plugin")
    _fake_entry_points(monkeypatch, [_FakeEntryPoint("broken", "broken.plugin", None),
                                     _FakeEntryPoint("good_plugin", "good_plugin", good)])
    pm = PluginManager(autoload=True)
    assert "my_task" in pm.registries.task
    assert "missing_dependency" in pm.failed["broken"]


def test_duplicate_component_across_plugins_names_both_and_keeps_the_first(caplog):
    a = _make_plugin_module("plugin_a")
    b = _make_plugin_module("plugin_b")
    pm = PluginManager(autoload=False, plugins=[a, b])
    with caplog.at_level(logging.WARNING, logger="distillkit.plugins"):
        registries = pm.registries
    message = pm.failed["plugin_b"]
    assert "task 'my_task' is registered twice: by plugin 'plugin_a' and by plugin 'plugin_b'" in message
    assert registries.task.entry("my_task").plugin == "plugin_a"
    assert list(pm.info) == ["builtin", "plugin_a"]
    assert [r.getMessage() for r in caplog.records] == [message]


def test_a_plugin_registering_one_name_twice_is_named_once():
    module = types.ModuleType("twice")

    @hookimpl
    def register_encoders(register):
        from distillkit.builtin.components import MLPEncoder

        register("enc", MLPEncoder)
        register("enc", MLPEncoder)

    module.register_encoders = register_encoders
    pm = PluginManager(autoload=False, plugins=[module])
    assert "enc" not in pm.registries.encoder
    assert "plugin 'twice' registers encoder 'enc' twice" in pm.failed["twice"]


class _FakeDist:
    """What importlib.metadata knows of a distribution: its name, version and requirements."""

    name = "houses"
    version = "0.3.1"
    requires = ["torch>=2.2", "nltk>=3.8; extra == 'text'", "pillow>=10; extra == 'images'",
                "pillow>=10; extra == 'houses-all'", "numpy>=1.24"]


def _failing_plugin(name: str, missing: str):
    """Registers a task, then fails in ``register_encoders`` and ``register_commands`` as a
    plugin that imports an absent module inside its hooks does."""
    module = types.ModuleType(name)

    @hookimpl
    def register_tasks(register):
        from distillkit.builtin.classification import ClassificationTask

        register("house_price", ClassificationTask)

    @hookimpl
    def register_encoders(register):
        raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)

    module.register_tasks, module.register_encoders = register_tasks, register_encoders
    return module


@pytest.mark.parametrize("missing, hint", [
    ("nltk", "Install its extra: pip install 'houses[text]'."),
    ("PIL.Image", "Install its extra: pip install 'houses[images]'."),  # import name differs from the distribution's
    ("numpy", "Reinstall its dependencies: pip install 'houses'."),
    ("sklearn", "Install the missing module: pip install scikit-learn."),
])
def test_a_hook_that_fails_to_import_is_rolled_back_and_reported_once(monkeypatch, caplog, missing, hint):
    broken = _failing_plugin("houses", missing)
    good = _make_plugin_module("good_plugin")
    ep = _FakeEntryPoint("houses", "houses.plugin", broken)
    ep.dist = _FakeDist()
    _fake_entry_points(monkeypatch, [ep, _FakeEntryPoint("good_plugin", "good_plugin", good)])
    pm = PluginManager(autoload=True)
    with caplog.at_level(logging.WARNING, logger="distillkit.plugins"):
        registries = pm.registries
        registries = pm.registries  # a second look reports nothing new
    # its task, registered before the failing hook, is gone; the other plugin's is there
    assert "house_price" not in registries.task
    assert registries.task.entry("my_task").plugin == "good_plugin"
    assert "houses" not in pm.info and "good_plugin" in pm.info
    top = missing.split(".")[0]
    assert pm.failed["houses"] == (
        f"plugin 'houses' is unavailable: No module named '{missing}' (in its register_encoders hook). {hint} "
        f"Its components and commands are left out (set DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD=1 to load no plugins).")
    assert f"'{top}" in pm.failed["houses"]
    assert [r.getMessage() for r in caplog.records] == [pm.failed["houses"]]


def test_an_import_error_at_load_names_the_extra_of_the_distribution(monkeypatch):
    ep = _FakeEntryPoint("houses", "houses.plugin", None)
    ep.load = lambda: (_ for _ in ()).throw(ModuleNotFoundError("No module named 'nltk'", name="nltk"))
    ep.dist = _FakeDist()
    _fake_entry_points(monkeypatch, [ep])
    pm = PluginManager(autoload=True)
    assert pm.failed["houses"].startswith("plugin 'houses' is unavailable: No module named 'nltk' "
                                          "(importing houses.plugin). Install its extra: pip install 'houses[text]'.")
    assert "classification" in pm.registries.task


def test_any_exception_in_a_hook_is_reported_and_the_builtins_keep_working():
    module = types.ModuleType("buggy")

    @hookimpl
    def register_datasets(register):
        raise RuntimeError("the CSV reader is not configured")

    module.register_datasets = register_datasets
    pm = PluginManager(autoload=False, plugins=[module])
    assert pm.registries.dataset.names() == ["toy_blobs", "toy_regression"]
    assert pm.failed["buggy"].startswith(
        "plugin 'buggy' is unavailable: RuntimeError: the CSV reader is not configured (in its register_datasets hook).")


def test_a_failing_command_hook_takes_back_its_commands_and_components():
    import click

    module = _make_plugin_module("half")

    @hookimpl
    def register_commands(cli):
        @cli.command("half-done")
        def half_done():
            pass

        raise ModuleNotFoundError("No module named 'openpyxl'", name="openpyxl")

    module.register_commands = register_commands
    pm = PluginManager(autoload=False, plugins=[module])
    assert "my_task" in pm.registries.task  # registered before the CLI asked for commands
    group = click.Group()
    pm.add_commands(group)
    assert "half-done" not in group.commands
    assert "my_task" not in pm.registries.task and "half" not in pm.info
    assert "No module named 'openpyxl' (in its register_commands hook)" in pm.failed["half"]


def test_a_plugin_command_named_like_another_is_refused_naming_both():
    import click

    def adds(name: str, command: str):
        module = types.ModuleType(name)

        @hookimpl
        def register_commands(cli):
            @cli.command(command)
            def impostor():
                click.echo(name)

        module.register_commands = register_commands
        return module

    pm = PluginManager(autoload=False, plugins=[adds("first", "fetch"), adds("second", "fetch"), adds("third", "run")])
    group = click.Group()

    @group.command("run")
    def run():
        pass

    pm.add_commands(group)
    assert sorted(group.commands) == ["fetch", "run"] and group.commands["run"] is run
    assert pm.info["first"].commands == ["fetch"]
    from click.testing import CliRunner

    assert CliRunner().invoke(group, ["fetch"]).output == "first\n"
    assert "command 'fetch' is registered twice: by plugin 'first' and by plugin 'second'" in pm.failed["second"]
    assert "command 'run' is registered twice: by the core and by plugin 'third'" in pm.failed["third"]


def test_plugins_command_lists_components_commands_and_failures(fresh_plugin_manager):
    import click
    from click.testing import CliRunner

    from distillkit.cli import cli
    from distillkit.plugins import set_plugin_manager

    module = _make_plugin_module("houses")

    @hookimpl
    def register_commands(cli):
        @cli.command("fetch-prices")
        def fetch_prices():
            click.echo("fetched")

        @cli.command("price-report")
        def price_report():
            pass

    module.register_commands = register_commands
    broken = _failing_plugin("broken_plugin", "nltk")
    set_plugin_manager(PluginManager(autoload=False, plugins=[module, broken]))
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("builtin ") and lines[1] == "  tasks: classification, regression"
    [core] = [line for line in lines[:lines.index("houses 9.9 (explicit)")] if line.startswith("  commands: ")]
    core_commands = set(core[len("  commands: "):].split(", "))
    assert {"config-doc", "eval", "new-plugin", "plugins", "predict", "report", "run", "sweep", "validate"} <= core_commands
    assert "fetch-prices" not in core
    start = lines.index("houses 9.9 (explicit)")
    assert lines[start + 1:start + 3] == ["  tasks: my_task", "  commands: fetch-prices, price-report"]
    assert lines[-1].startswith("plugin 'broken_plugin' is unavailable: No module named 'nltk' "
                                "(in its register_encoders hook). Install the missing module: pip install nltk.")
    assert not any(line.startswith("broken_plugin ") for line in lines)


def test_registry_entries_carry_the_plugin_version_and_components_name_their_plugins():
    from distillkit.builtin.classification import ClassificationTask
    from distillkit.builtin.components import MLPEncoder
    from distillkit.config import validate_component

    module = _make_plugin_module("my_plugin")  # __version__ 9.9
    registries = PluginManager(autoload=False, plugins=[module]).registries
    assert registries.task.entry("my_task").version == "9.9"
    ours = validate_component("task", {"kind": "my_task"}, registries)
    builtin = validate_component("task", {"kind": "classification"}, registries)
    student = validate_component("student", {"kind": "multitask", "encoder": {"kind": "mlp", "in_features": 4}},
                                 registries)
    version = registries.task.entry("classification").version
    assert registries.plugins_of(ours) == {"my_plugin": "9.9"}
    assert registries.plugins_of(builtin, student) == {"builtin": version}
    assert registries.plugins_of({"a": [ours], "b": builtin}) == {"builtin": version, "my_plugin": "9.9"}
    # a component class or instance: every plugin that registered it (my_plugin re-registers this one)
    assert registries.plugins_of(MLPEncoder) == {"builtin": version}
    assert registries.plugins_of(ClassificationTask("t", builtin)) == {"builtin": version, "my_plugin": "9.9"}


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


def test_an_unknown_kind_error_names_the_plugin_that_failed_to_load(fresh_plugin_manager, tmp_path):
    import yaml
    from click.testing import CliRunner

    from distillkit.cli import cli
    from distillkit.plugins import set_plugin_manager

    from tests.conftest import toy_config

    config = toy_config()
    config["tasks"]["cluster"] = {"kind": "house_price"}  # the task the broken plugin would register
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    set_plugin_manager(PluginManager(autoload=False, plugins=[_failing_plugin("houses", "nltk")]))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "unknown task 'house_price'" in result.output
    assert result.output.rstrip().endswith("Note: plugin 'houses' failed to load (see the warning above); a kind it "
                                           "registers is unknown until it loads.")

    # no failed plugin, or an error that is not about an unknown name: no note
    set_plugin_manager(PluginManager(autoload=False))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2 and "unknown task 'house_price'" in result.output and "Note:" not in result.output
    config["tasks"]["cluster"] = {"kind": "classification", "hidden": "wide"}
    path.write_text(yaml.safe_dump(config))
    set_plugin_manager(PluginManager(autoload=False, plugins=[_failing_plugin("houses", "nltk")]))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2 and "hidden" in result.output and "Note:" not in result.output
