"""Modules imported on first use: torch, matplotlib, dp-accounting, scipy's stats and sparse.

Parsing the Snakefile imports every module that defines a kind the config can name (its
descriptor: name, parameters, traits), and that parse must not import torch (every
cluster job parses the Snakefile again; a report job should not pay for it). A module
whose *implementation* needs torch but whose *definition* does not writes::

    from fedmia.core.lazy import torch, F

and uses ``torch.randn``, ``F.one_hot`` … as usual: the real module is imported the first
time an attribute is read (in a job), never at import. Only run-time use is allowed:
a decorator or default argument that touches ``torch`` at import (``@torch.no_grad()``,
``dtype=torch.float32``) would import it — ``tests/test_workflow.py`` parses the
workflow with a torch that raises on import, so such a use fails a test. Type
annotations are strings (``from __future__ import annotations``) and cost nothing.
The same holds for plugins (docs/extending.md). Modules that subclass torch classes at
import (the networks) are named by a dotted path in their kind's descriptor instead
(:mod:`fedmia.core.registry`).

This follows the lazy-loading pattern of the Scientific Python ecosystem (SPEC 1).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for module ``name`` that imports it on first attribute access.

    Args:
        name: the dotted module name.
        before: called once, just before the import (e.g. choosing matplotlib's backend).
    """

    def __init__(self, name: str, before: Callable[[], None] | None = None) -> None:
        super().__init__(name, f"{name}, imported on first use (fedmia.core.lazy)")
        self.__dict__["_lazy_before"] = before
        self.__dict__["_lazy_module"] = None

    def _load(self) -> types.ModuleType:
        module = self.__dict__["_lazy_module"]
        if module is None:
            before = self.__dict__["_lazy_before"]
            if before is not None:
                before()
            module = importlib.import_module(self.__name__)
            self.__dict__["_lazy_module"] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._load())

    @property
    def loaded(self) -> bool:
        """Whether the real module has been imported through this stand-in."""
        return self.__dict__["_lazy_module"] is not None


def _agg() -> None:
    """Matplotlib without a display: the Agg backend, before pyplot is imported."""
    importlib.import_module("matplotlib").use("Agg")


#: ``import torch``, on first use.
torch = LazyModule("torch")
#: ``import torch.nn.functional as F``, on first use.
F = LazyModule("torch.nn.functional")
#: ``import dp_accounting`` (Google's DP accountants; 2 s to import), on first use.
dp_accounting = LazyModule("dp_accounting")
#: ``import matplotlib.pyplot as plt`` with the Agg backend, on first use.
plt = LazyModule("matplotlib.pyplot", before=_agg)
#: ``from scipy import stats`` (about 0.3 s to import, beyond numpy), on first use: the
#: report jobs import the bootstrap module and most never call it.
scipy_stats = LazyModule("scipy.stats")
#: ``from scipy import sparse`` (about 0.2 s), on first use.
scipy_sparse = LazyModule("scipy.sparse")
