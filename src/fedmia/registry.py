"""Name → object registries (datasets, models, defenses, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

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
