"""aiayn: the Transformer of "Attention Is All You Need", from scratch, as an NMT toolkit."""

from __future__ import annotations

from typing import Any

from aiayn.config import DecodeConfig, ModelConfig

__version__ = "0.1.0"

# Heavier names are imported on first use so that `aiayn --help` and `import aiayn` stay fast.
_LAZY = {
    "Transformer": "aiayn.model.transformer",
    "Translator": "aiayn.decoding.translator",
    "Tokenizer": "aiayn.files.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aiayn' has no attribute {name!r}")


__all__ = ["ModelConfig", "DecodeConfig", "Transformer", "Translator", "Tokenizer", "__version__"]
