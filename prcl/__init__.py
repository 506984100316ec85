"""prcl: the pair relevance classification loss, fused so the B×N logit matrix never exists.

The public names load their modules (and torch) on first use, so that `prcl --help` and the
command-line parsers answer without importing torch.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["fused_pair_bce", "default_bias", "__version__"]

_HOMES = {"fused_pair_bce": "prcl.functional", "default_bias": "prcl.core.contract"}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'prcl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + list(_HOMES))
