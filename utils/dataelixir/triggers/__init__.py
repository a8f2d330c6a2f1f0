"""Backdoor triggers: one module per attack (``TRIGGER``), their base class and the registry.

Every trigger works on batched ``uint8 [N, 3, S, S]`` tensors and returns the same
dtype and shape; see ``base.Trigger``.
"""

from utils.dataelixir.triggers.base import Log, Trigger, aux_subset, cache_dir, coerce_params, require, settings_key
from utils.dataelixir.triggers.registry import TRIGGERS, get_trigger

__all__ = [
    "Log",
    "TRIGGERS",
    "Trigger",
    "aux_subset",
    "cache_dir",
    "coerce_params",
    "get_trigger",
    "require",
    "settings_key",
]
