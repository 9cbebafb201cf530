"""Registries: small name -> component maps filled by plugins.

A component is any object (usually a class) with an optional pydantic ``Params`` model.
Lookups by an unknown name list the known names and suggest the closest one; a duplicate
name names both plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from distillkit.errors import DistillkitError, did_you_mean, plural

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    component: T
    plugin: str
    #: the version of the plugin's distribution (or its ``__version__``); enters stage keys
    version: str = "-"


class Registry(Generic[T]):
    """A named collection of components of one kind (tasks, encoders, ...)."""

    def __init__(self, kind: str, check: Callable[[str, Any, str], None] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        #: called as ``check(name, component, plugin)`` before a component is added; raises
        #: a DistillkitError naming the plugin for a component that declares nonsense
        self.check = check

    def register(self, name: str, component: T, plugin: str = "<unknown>", version: str = "-") -> T:
        if name in self._entries:
            other = self._entries[name].plugin
            if other == plugin:
                raise DistillkitError(f"plugin '{plugin}' registers {self.kind} '{name}' twice.",
                                      hint="Register each name once.")
            raise DistillkitError(
                f"{self.kind} '{name}' is registered twice: by plugin '{other}' and by plugin '{plugin}'.",
                hint="Rename one of them or disable one plugin.",
            )
        if self.check is not None:
            self.check(name, component, plugin)
        self._entries[name] = Entry(name, component, plugin, version)
        return component

    def remove(self, name: str) -> None:
        """Forget ``name`` (a plugin that failed half-way is rolled back this way)."""
        self._entries.pop(name, None)

    def get(self, name: str, where: str | None = None) -> T:
        try:
            return self._entries[name].component
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise DistillkitError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, self._entries)} Known {plural(self.kind)}: {known}.",
                where=where,
            ) from None

    def entry(self, name: str) -> Entry[T]:
        self.get(name)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


# Every kind of component a plugin can register, in the order `distillkit plugins` shows them.
KINDS = ("task", "encoder", "student", "teacher", "loss", "aggregation", "dataset", "augmentation", "stage")


class Registries:
    """One registry per component kind; built fresh by each plugin manager."""

    def __init__(self) -> None:
        from distillkit.metric_direction import check_task_class

        self.by_kind: dict[str, Registry[Any]] = {k: Registry(k) for k in KINDS}
        # a task's metric directions and soft-target kinds are checked when it registers
        self.by_kind["task"].check = check_task_class

    def plugins_of(self, *things: Any) -> dict[str, str]:
        """``{plugin: version}`` of every registered component that ``things`` use.

        A thing is a component's params (a pydantic model with ``kind``, searched with every
        model, mapping and list nested in it) or a component instance or class. Stage keys and
        caches include this so that a new version of a plugin never reuses stale results.
        """
        from pydantic import BaseModel

        found: dict[str, str] = {}

        def note(entry: Entry[Any]) -> None:
            found[entry.plugin] = entry.version

        def visit(value: Any) -> None:
            if isinstance(value, BaseModel):
                kind = getattr(value, "kind", None)
                if isinstance(kind, str):
                    # the component of that name whose Params these are (a task and an encoder may
                    # share a name); every component of that name when none declares them
                    matches = [r._entries[kind] for r in self.by_kind.values() if kind in r]
                    typed = [e for e in matches if isinstance(getattr(e.component, "Params", None), type)
                             and isinstance(value, e.component.Params)]
                    for entry in typed or matches:
                        note(entry)
                for name in type(value).model_fields:
                    visit(getattr(value, name))
            elif isinstance(value, Mapping):
                for item in value.values():
                    visit(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    visit(item)
            elif value is not None and not isinstance(value, (str, bytes, int, float, PurePath)):
                cls = value if isinstance(value, type) else type(value)
                for registry in self.by_kind.values():
                    for entry in registry._entries.values():
                        if entry.component is value or entry.component is cls:
                            note(entry)

        for thing in things:
            visit(thing)
        return dict(sorted(found.items()))

    def __getattr__(self, kind: str) -> Registry[Any]:
        # `registries.task`, `registries.encoder`, ...
        try:
            return self.__dict__["by_kind"][kind]
        except KeyError:
            raise AttributeError(kind) from None
