"""Registries: small name -> component maps filled by plugins.

A component is any object (usually a class) with an optional pydantic ``Params`` model.
Lookups by an unknown name list the known names and suggest the closest one; a duplicate
name names both plugins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from distillkit.errors import DistillkitError, did_you_mean

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    component: T
    plugin: str


class Registry(Generic[T]):
    """A named collection of components of one kind (tasks, encoders, ...)."""

    def __init__(self, kind: str, check: Callable[[str, Any, str], None] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        #: called as ``check(name, component, plugin)`` before a component is added; raises
        #: a DistillkitError naming the plugin for a component that declares nonsense
        self.check = check

    def register(self, name: str, component: T, plugin: str = "<unknown>") -> T:
        if name in self._entries:
            other = self._entries[name].plugin
            raise DistillkitError(
                f"{self.kind} '{name}' is registered twice: by plugin '{other}' and by plugin '{plugin}'.",
                hint="Rename one of them or disable one plugin.",
            )
        if self.check is not None:
            self.check(name, component, plugin)
        self._entries[name] = Entry(name, component, plugin)
        return component

    def get(self, name: str, where: str | None = None) -> T:
        try:
            return self._entries[name].component
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise DistillkitError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, self._entries)} Known {self.kind}s: {known}.",
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

    def __getattr__(self, kind: str) -> Registry[Any]:
        # `registries.task`, `registries.encoder`, ...
        try:
            return self.__dict__["by_kind"][kind]
        except KeyError:
            raise AttributeError(kind) from None
