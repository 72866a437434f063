"""Kinds by name: one registry per kind the config names, one spelling to register them.

A *kind* is anything the config names by a string: a dataset, a partition, a model, a
defense, a measure route, an attack, a non-member protocol, a single-round selection, a
finding, a figure. Each family has one :class:`Registry`, defined next to what it
registers (``DATASETS`` in :mod:`fedmia.federation.datasets`, ``ATTACKS`` in
:mod:`fedmia.attacker.attacks`, …; :mod:`fedmia.kinds` lists them all), and every kind
is registered with the same call, ``<REGISTRY>.register(name, …)``, in one of three forms:

* above its implementation, as a decorator, when the module imports without torch (a
  loader, a partition, a defense — whose torch is :mod:`fedmia.core.lazy`)::

      @DEFENSES.register("dp")
      class DPDefense(Defense): ...

* with ``impl="module:attribute"`` when the implementation needs torch at import (a
  network subclassing ``nn.Module``): the parse reads the name and the facts, a job loads
  the implementation on first :meth:`Registry.get`::

      MODELS.register("alexnet", impl="fedmia.federation.nets:alexnet", parameters=...)

* facts only, for a kind that is data (an attack, a protocol): the family's ``build``
  makes its descriptor from them::

      ATTACKS.register("loss", measure="loss", sign=-1, kind="single", family="loss")

The facts of a kind (its traits: a model's cost, a dataset's size, a protocol's
description) live in its registration and nowhere else; the config schema's lists of
kinds, its per-defense blocks, resource estimates and table captions are derived from
them when the workflow is parsed (:mod:`fedmia.workflow`).

**Plugins.** A plugin is an importable module that registers kinds the same way. The
config's ``plugins:`` list names them; :func:`import_plugins` imports them when the
workflow is parsed and at the start of every job, so a plugin's kinds are validated, run
and reported like the built-in ones without an edit to fedmia.

This module imports nothing of fedmia: the registries depend on it, never the reverse.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """A registered kind: its implementation (or where to load it) and its facts."""

    name: str
    obj: T | None = None
    impl: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)

    def load(self, what: str) -> T:
        """The implementation, imported from ``impl`` on first use."""
        if self.obj is None:
            if self.impl is None:
                raise ValueError(
                    f"{what} '{self.name}' was registered without an "
                    "implementation; decorate one or give impl='module:attr'"
                )
            module, _, attr = self.impl.partition(":")
            try:
                self.obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ImportError(
                    f"{what} '{self.name}': cannot load its implementation "
                    f"{self.impl!r} ({e}); fix the registration's impl"
                ) from e
        return self.obj


class Registry(Generic[T]):
    """A mapping from names to kinds that fails loudly on unknown names.

    Args:
        what: the family's name, for messages (``"defense"``).
        build: makes the registered object from what :meth:`register` gets: with
            ``decorates``, ``build(decorated, **facts)``; without, ``build(name=name,
            **facts)``. ``None``: the decorated object itself.
        decorates: whether :meth:`register` without ``impl`` is a decorator (the kind has
            code) or registers the facts at once (the kind is data).
    """

    def __init__(
        self, what: str, *, build: Callable[..., T] | None = None, decorates: bool = True
    ) -> None:
        self.what = what
        self.build = build
        self.decorates = decorates
        self._items: dict[str, Entry[T]] = {}

    def _add(self, entry: Entry[T]) -> None:
        if entry.name in self._items:
            raise ValueError(f"{self.what} '{entry.name}' is already registered; pick another name")
        self._items[entry.name] = entry

    def register(self, name: str, *, impl: str | None = None, **facts: Any) -> Any:
        """Register kind ``name``: the one spelling for every kind (see the module doc).

        Returns:
            A decorator (a family that ``decorates``, without ``impl``), the built object (a
            family of data), or ``None`` (with ``impl``).
        """
        if impl is not None:
            if ":" not in impl:
                raise ValueError(
                    f"{self.what} '{name}': impl must be 'module:attribute', got {impl!r}"
                )
            self._add(Entry(name, impl=impl, facts=dict(facts)))
            return None
        if not self.decorates:
            obj = self.build(name=name, **facts) if self.build else facts
            self._add(Entry(name, obj=obj, facts=dict(facts)))
            return obj

        def deco(obj: Any) -> Any:
            built = self.build(obj, **facts) if self.build else obj
            self._add(Entry(name, obj=built, facts=dict(facts)))
            return obj

        return deco

    def _entry(self, name: str) -> Entry[T]:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown {self.what} '{name}'; choose from {sorted(self._items)}"
            ) from None

    def get(self, name: str) -> T:
        """The kind ``name`` (its implementation, loaded if registered by ``impl``).

        Raises:
            ValueError: an unknown name, listing the registered ones.
        """
        return self._entry(name).load(self.what)

    def facts(self, name: str) -> Mapping[str, Any]:
        """The facts kind ``name`` was registered with (never loads its implementation)."""
        return self._entry(name).facts

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def registered(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class PluginError(ImportError):
    """A plugin module named in the config cannot be found."""


def import_plugins(modules: Iterable[str]) -> None:
    """Import each plugin module, in order; importing it registers its kinds.

    A module already imported is not run again (Python caches it), so calling this at
    parse time and again in a job is cheap.

    A plugin is looked up on ``sys.path`` (``PYTHONPATH``, installed packages) and then in
    the working directory, as ``python -m`` would (``snakemake`` and its jobs run there):
    a plugin kept with the project (``examples/flower``: ``examples.flower.digits_app.
    fedmia_plugin``) needs no ``PYTHONPATH``.

    Raises:
        PluginError: a module (or the package that should hold it) does not exist.
        Exception: whatever the plugin's own code raises on import (e.g. a ``ValueError``
            for a name that is already registered).
    """
    modules = list(modules)
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the plugin exists but imports something missing: its own error
            raise PluginError(
                f"plugin '{name}' cannot be imported: no module named '{e.name}'; put the "
                "folder that holds it on PYTHONPATH (or install it) where Snakemake and its "
                "jobs run, or drop it from plugins"
            ) from None
