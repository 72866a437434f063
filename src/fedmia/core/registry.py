"""Name → object registries: every kind the config names, and the plugins that add kinds.

Each registry below is filled by the module that implements its kind, with the
registry's decorator (``@DEFENSES.register("dp")`` in :mod:`fedmia.federation.defenses`, ...):

==================  ===============================  ==========================================
registry            filled by                        config key
==================  ===============================  ==========================================
``DATASETS``        :mod:`fedmia.federation.datasets`           ``datasets.<key>.kind``
``PARTITIONS``      :mod:`fedmia.federation.partition`          ``partitions.<key>.kind``
``MODELS``          :mod:`fedmia.federation.models`             ``models.<key>.kind``
``DEFENSES``        :mod:`fedmia.federation.defenses`           ``defenses.<key>.kind``
``MEASURE_ROUTES``  :mod:`fedmia.attacker.measures`           ``measure.route``
``ATTACKS``         :mod:`fedmia.attacker.attacks`            ``attack.attacks``
``FIGURES``         :mod:`fedmia.report`             the per-cell figures (``rounds``, ``roc``)
==================  ===============================  ==========================================

The registries live here, apart from what they register, so that the workflow can read
them when it parses the Snakefile without importing torch: the built-in kinds of the
torch-backed modules reach the parse through the config schema (a test keeps the
schema equal to what the registries generate), and the kinds of *plugins* through
these registries.

**Plugins.** A plugin is an importable module that registers kinds with these
decorators (e.g. ``from fedmia.federation.defenses import DEFENSES, Defense``). The config's
``plugins:`` list names them; :func:`import_plugins` imports them when the workflow
is parsed and at the start of every job, before anything is built, so a plugin's kinds
are validated, run and reported like the built-in ones without an edit to fedmia.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:  # types only: the registries do not depend on what they register
    from fedmia.attacker.attacks import AttackSpec
    from fedmia.attacker.measures import GradProducts
    from fedmia.federation.datasets import DatasetKind
    from fedmia.federation.defenses import DefenseFactory
    from fedmia.federation.models import ModelFactory
    from fedmia.federation.partition import PartitionKind
    from fedmia.report import CellFigure

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to objects that fails loudly on unknown names.

    Example::

        MODELS = Registry("model")

        @MODELS.register("alexnet")
        def alexnet(...): ...

        MODELS.get("alexnet")   # -> the function
        MODELS.get("vgg")       # ValueError: unknown model 'vgg'; choose from ['alexnet']
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise a ``ValueError`` listing the names."""
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.what} '{name}'; choose from {sorted(self._items)}"
            ) from None

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


DATASETS: Registry[DatasetKind] = Registry("dataset")
PARTITIONS: Registry[PartitionKind] = Registry("partition kind")
MODELS: Registry[ModelFactory] = Registry("model")
DEFENSES: Registry[DefenseFactory] = Registry("defense")
MEASURE_ROUTES: Registry[GradProducts] = Registry("measure route")
ATTACKS: Registry[AttackSpec] = Registry("attack")
FIGURES: Registry[CellFigure] = Registry("figure")
#: Every registry, by the config's name of its kind (the schema checks use these names).
REGISTRIES: dict[str, Registry[Any]] = {
    "datasets": DATASETS, "partitions": PARTITIONS, "models": MODELS, "defenses": DEFENSES,
    "measure routes": MEASURE_ROUTES, "attacks": ATTACKS, "figures": FIGURES}


class PluginError(ImportError):
    """A plugin module named in the config cannot be found."""


def import_plugins(modules: Iterable[str]) -> None:
    """Import each plugin module, in order; importing it registers its kinds.

    A module already imported is not run again (Python caches it), so calling this at
    parse time and again in a job is cheap.

    Raises:
        PluginError: a module (or the package that should hold it) does not exist.
        Exception: whatever the plugin's own code raises on import (e.g. a ``ValueError``
            for a name that is already registered).
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the plugin exists but imports something missing: its own error
            raise PluginError(
                f"plugin '{name}' cannot be imported: no module named '{e.name}'; put the "
                "folder that holds it on PYTHONPATH (or install it) where Snakemake and its "
                "jobs run, or drop it from plugins") from None
