"""The measure routes (``measure.route``): how ⟨g_i, Δ_k⟩ and ‖g_i‖² of a chunk are computed.

Each route is registered with the dotted path of its implementation in
:mod:`fedmia.attacker.measures` (which needs torch at import; the parse of the Snakefile
reads only the names here):

* ``layerwise`` (default): from one batched forward and backward pass, layer by layer
  (:mod:`fedmia.attacker.layerwise`), falling back to ``func`` for a model it does not
  cover;
* ``func``: per-sample gradients with ``torch.func`` (vmap of grad), contracted with the
  K stacked updates — simple and general, the reference of the tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedmia.core.registry import Registry

#: A route: ``(model, params, buffers, x, y, updates) → (dots B×K, sqnorm B)``.
GradProducts = Callable[..., tuple[Any, Any]]
#: The measure routes, by name.
MEASURE_ROUTES: Registry[GradProducts] = Registry("measure route")

MEASURE_ROUTES.register("layerwise", impl="fedmia.attacker.measures:auto_grad_products")
MEASURE_ROUTES.register("func", impl="fedmia.attacker.measures:per_sample_grad_products")
