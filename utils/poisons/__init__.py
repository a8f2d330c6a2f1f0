"""Clean-label availability poisons (ECLIPSE's threat): one module each, ``craft(ctx)``.

The registry (``POISONS``, ``OPTIONS``, ``resolve_params``) is in ``registry``; the crafting
context, state and shared steps in ``common``; the run of ``poison.py`` in ``run``.
"""

from utils.poisons.common import CraftContext, CraftResult, PoisonSpec
from utils.poisons.registry import OPTIONS, POISONS, get_craft, get_poison, resolve_params

__all__ = [
    "OPTIONS",
    "POISONS",
    "CraftContext",
    "CraftResult",
    "PoisonSpec",
    "get_craft",
    "get_poison",
    "resolve_params",
]
