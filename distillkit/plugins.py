"""The plugin manager: loads built-in and installed plugins and fills the registries.

Plugins are found through the ``distillkit`` entry-point group. Set
``DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the built-in components (and any
plugin passed explicitly), as pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` does.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from distillkit import hookspecs
from distillkit.errors import DistillkitError
from distillkit.registry import Registries

hookimpl = pluggy.HookimplMarker("distillkit")

AUTOLOAD_ENV = "DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD"
ENTRY_POINT_GROUP = "distillkit"
DEFAULT_PLUGINS = ("distillkit.builtin.plugin",)

# hook name -> registry kind it fills
_REGISTER_HOOKS = {
    "register_tasks": "task",
    "register_encoders": "encoder",
    "register_students": "student",
    "register_teachers": "teacher",
    "register_losses": "loss",
    "register_aggregations": "aggregation",
    "register_datasets": "dataset",
    "register_augmentations": "augmentation",
    "register_stages": "stage",
}


@dataclass
class PluginInfo:
    name: str
    version: str
    source: str  # "builtin", "entry point", "explicit"
    components: dict[str, list[str]] = field(default_factory=dict)


class PluginManager:
    """Loads plugins once and exposes their components through :attr:`registries`."""

    def __init__(self, autoload: bool | None = None, plugins: Iterable[Any] = ()):
        self.pm = pluggy.PluginManager("distillkit")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        #: plugins whose entry point failed to import: name -> message
        self.failed: dict[str, str] = {}
        own_version = _dist_version("distillkit")
        for module_name in DEFAULT_PLUGINS:
            self._add(importlib.import_module(module_name), "builtin", own_version, "builtin")
        if autoload is None:
            autoload = not os.environ.get(AUTOLOAD_ENV)
        if autoload:
            self._load_entry_points()
        for plugin in plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            self._add(plugin, name, getattr(plugin, "__version__", "-"), "explicit")
        # A misspelt hook implementation (``register_task`` for ``register_tasks``) fails here.
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise DistillkitError(f"a plugin implements an unknown hook: {exc}") from None
        self._registries: Registries | None = None

    @property
    def registries(self) -> Registries:
        """Every registered component by kind; filled on first use (this imports torch)."""
        if self._registries is None:
            self._registries = Registries()
            try:
                self._fill_registries()
            except BaseException:
                self._registries = None
                raise
        return self._registries

    def _add(self, plugin: Any, name: str, version: str, source: str) -> None:
        if name in self.info:
            return
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise DistillkitError(f"plugin '{name}' is invalid: {exc}") from None
        self.info[name] = PluginInfo(name, version, source)

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.info:
                continue
            try:
                plugin = ep.load()
            except ImportError as exc:
                # One broken plugin must not take the others down: it is reported, not loaded.
                self.failed[ep.name] = (
                    f"plugin '{ep.name}' ({ep.value}) could not be imported: {exc}. Install its dependencies "
                    f"(for the eye plugin: pip install 'distillkit[eye]'), or set {AUTOLOAD_ENV}=1.")
                continue
            version = ep.dist.version if ep.dist is not None else "-"
            self._add(plugin, ep.name, version, "entry point")

    def _fill_registries(self) -> None:
        for hook_name, kind in _REGISTER_HOOKS.items():
            registry = self._registries.by_kind[kind]
            # Call each implementation on its own so that every component knows its plugin.
            for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
                plugin_name = impl.plugin_name

                def register(name: str, component: Any, _plugin: str = plugin_name) -> Any:
                    registry.register(name, component, plugin=_plugin)
                    self.info[_plugin].components.setdefault(kind, []).append(name)
                    return component

                impl.function(register=register)

    def add_commands(self, cli: Any) -> None:
        self.pm.hook.register_commands(cli=cli)


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default


def set_plugin_manager(manager: PluginManager | None) -> None:
    """Replace (or with ``None`` reset) the process-wide plugin manager; used by tests."""
    global _default
    _default = manager
