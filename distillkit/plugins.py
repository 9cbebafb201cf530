"""The plugin manager: loads built-in and installed plugins and fills the registries.

Plugins are found through the ``distillkit`` entry-point group. Set
``DISTILLKIT_DISABLE_PLUGIN_AUTOLOAD=1`` to load only the built-in components (and any
plugin passed explicitly), as pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` does.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from distillkit import hookspecs
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.registry import Registries, Registry

log = logging.getLogger("distillkit.plugins")

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
    #: the CLI commands its ``register_commands`` added
    commands: list[str] = field(default_factory=list)
    #: the distribution that ships it (for the extra to install when it fails), if known
    dist: Any = None


class PluginManager:
    """Loads plugins once and exposes their components through :attr:`registries`.

    Every hook of a plugin runs in a guard: a plugin that fails (an ``ImportError`` at load or
    inside a hook, a name another plugin registered already, any other exception) is reported
    once as a ``warning`` log line naming it, the missing module and the extra to install, and
    unregistered with whatever it had registered; the other plugins keep working.
    """

    def __init__(self, autoload: bool | None = None, plugins: Iterable[Any] = ()):
        self.pm = pluggy.PluginManager("distillkit")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        #: plugins that failed to import or whose hooks raised: name -> message
        self.failed: dict[str, str] = {}
        self._commands_collected = False
        self._cli: Any = None  # the group add_commands filled, to take a failed plugin's commands back
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
        # Each plugin's hooks were checked as it was added; this is a last safety net.
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

    def _add(self, plugin: Any, name: str, version: str, source: str, dist: Any = None) -> None:
        if name in self.info:
            return
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            if source == "builtin":
                raise DistillkitError(f"plugin '{name}' is invalid: {exc}") from None
            self._report(name, "at registration", DistillkitError(str(exc)), dist)
            return
        unknown = self._unknown_hooks(plugin)
        if unknown:
            # A misspelt hook (``register_task`` for ``register_tasks``) would register nothing
            # silently; it makes this plugin unavailable, not every plugin.
            self.pm.unregister(name=name)
            hook, *_ = unknown
            exc = DistillkitError(f"it implements an unknown hook '{hook}'."
                                  f"{did_you_mean(hook, self._hook_names())}",
                                  hint=f"Known hooks: {', '.join(self._hook_names())}.")
            if source == "builtin":
                raise exc
            self._report(name, "at registration", exc, dist)
            return
        self.info[name] = PluginInfo(name, version, source, dist=dist)

    def _hook_names(self) -> list[str]:
        return sorted(n for n in vars(hookspecs) if n.startswith("register_") and callable(getattr(hookspecs, n)))

    def _unknown_hooks(self, plugin: Any) -> list[str]:
        """Names of the plugin's hook implementations that no hook specification declares."""
        unknown = []
        for attr in dir(plugin):
            opts = self.pm.parse_hookimpl_opts(plugin, attr)
            if opts is None or opts.get("optionalhook"):
                continue
            caller = getattr(self.pm.hook, opts.get("specname") or attr, None)
            if caller is None or not caller.has_spec():
                unknown.append(opts.get("specname") or attr)
        return unknown

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.info or ep.name in self.failed:
                continue
            dist = getattr(ep, "dist", None)
            try:
                plugin = ep.load()
            except Exception as exc:
                # One broken plugin must not take the others down: it is reported, not loaded.
                self._report(ep.name, f"importing {ep.value}", exc, dist)
                continue
            version = getattr(dist, "version", None) or getattr(plugin, "__version__", None) or "-"
            self._add(plugin, ep.name, version, "entry point", dist)

    def _fill_registries(self) -> None:
        for name in list(self.info):
            # One plugin at a time, all its hooks, so that a failure rolls back only its own names.
            added: list[tuple[Registry[Any], str]] = []
            version = self.info[name].version
            try:
                for hook_name, kind in _REGISTER_HOOKS.items():
                    impl = self._impl(name, hook_name)
                    if impl is None:
                        continue
                    registry = self._registries.by_kind[kind]

                    def register(component_name: str, component: Any, _registry: Registry[Any] = registry) -> Any:
                        _registry.register(component_name, component, plugin=name, version=version)
                        added.append((_registry, component_name))
                        return component

                    impl.function(register=register)
            except Exception as exc:
                if self.info[name].source == "builtin":
                    raise  # the core itself is broken: nothing would work
                for registry, component_name in added:
                    registry.remove(component_name)
                self._fail(name, f"in its {hook_name} hook", exc)
                continue
            for registry, component_name in added:
                self.info[name].components.setdefault(registry.kind, []).append(component_name)

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add its commands to ``cli``; a plugin whose hook fails is dropped."""
        for name in list(self.info):
            impl = self._impl(name, "register_commands")
            if impl is None:
                continue
            before = dict(cli.commands)
            try:
                impl.function(cli=cli)
                replaced = [c for c in before if cli.commands.get(c) is not before[c]
                            and c not in self.info[name].commands]
                if replaced:
                    owner = next((f"plugin '{i.name}'" for i in self.info.values() if replaced[0] in i.commands),
                                 "the core")
                    raise DistillkitError(f"command '{replaced[0]}' is registered twice: by {owner} and by "
                                          f"plugin '{name}'.", hint="Rename one of them or disable one plugin.")
            except Exception as exc:
                cli.commands.clear()
                cli.commands.update(before)
                self._fail(name, "in its register_commands hook", exc)
                continue
            self.info[name].commands = sorted(c for c in cli.commands if cli.commands[c] is not before.get(c))
            for command in self.info[name].commands:
                self._guard_command(cli.commands[command], name)
        self._commands_collected = True
        self._cli = cli

    def _guard_command(self, command: Any, plugin: str) -> None:
        """A plugin's command runs only when all its hooks succeed: a hook that fails to import
        is found when the registries fill, which ``--help`` does not do (it stays fast)."""
        original = command.invoke

        def invoke(ctx: Any) -> Any:
            self.registries
            if plugin in self.failed:
                raise DistillkitError(f"'{command.name}' is a command of plugin '{plugin}', which is unavailable "
                                      f"(see the warning above).")
            return original(ctx)

        command.invoke = invoke

    def collect_commands(self) -> None:
        """Learn each plugin's command names (for ``distillkit plugins``) without a CLI at hand."""
        if not self._commands_collected:
            import click

            self.add_commands(click.Group())

    def _impl(self, plugin: str, hook_name: str) -> Any:
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == plugin:
                return impl
        return None

    def _fail(self, name: str, what: str, exc: Exception) -> None:
        """Unregister plugin ``name`` and everything it registered; report it once."""
        info = self.info.pop(name)
        self.pm.unregister(name=name)
        if self._registries is not None:
            for kind, names in info.components.items():
                for component_name in names:
                    self._registries.by_kind[kind].remove(component_name)
        if self._cli is not None:
            for command in info.commands:
                self._cli.commands.pop(command, None)
        self._report(name, what, exc, info.dist)

    def _report(self, name: str, what: str, exc: Exception, dist: Any) -> None:
        self.failed[name] = failure_message(name, what, exc, dist)
        log.warning("%s", self.failed[name])


def failure_message(plugin: str, what: str, exc: Exception, dist: Any = None) -> str:
    """One line: the plugin, what failed, the missing module and how to install it."""
    if isinstance(exc, DistillkitError):
        reason = exc.render().rstrip(".")
    elif isinstance(exc, ImportError):
        reason = str(exc).rstrip(".")
    else:
        reason = f"{type(exc).__name__}: {exc}".rstrip(".")
    message = f"plugin '{plugin}' is unavailable: {reason} ({what})."
    missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if missing:
        message += f" {_install_hint(missing.split('.')[0], plugin, dist)}"
    return f"{message} Its components and commands are left out (set {AUTOLOAD_ENV}=1 to load no plugins)."


# import name -> distribution name, where they differ
_DIST_OF_MODULE = {"PIL": "pillow", "cv2": "opencv-python", "sklearn": "scikit-learn", "yaml": "pyyaml",
                   "skimage": "scikit-image"}


def _install_hint(module: str, plugin: str, dist: Any) -> str:
    """``pip install 'distillkit[eye]'`` when an extra of the plugin's distribution lists the
    missing module, else ``pip install <module's distribution>``."""
    wanted = _normalise(_DIST_OF_MODULE.get(module, module))
    extras: list[str] = []
    base = False
    for requirement in (getattr(dist, "requires", None) or []) if dist is not None else []:
        match = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
        if match is None or _normalise(match.group(1)) != wanted:
            continue
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if extra:
            extras.append(extra.group(1))
        else:
            base = True
    dist_name = getattr(dist, "name", None) or (getattr(dist, "metadata", None) or {}).get("Name")
    if extras and dist_name:
        # the extra named like the plugin (``eye`` for ``eye_fundus``) when several list the module
        extras.sort(key=lambda e: not _normalise(plugin).startswith(_normalise(e)))
        return f"Install its extra: pip install '{dist_name}[{extras[0]}]'."
    if base and dist_name:
        return f"Reinstall its dependencies: pip install '{dist_name}'."
    return f"Install the missing module: pip install {_DIST_OF_MODULE.get(module, module)}."


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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
