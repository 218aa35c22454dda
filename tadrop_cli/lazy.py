"""torch, imported on first use.

Importing torch takes 1-2 s, more than a whole CPU merge of a small model by the compiled
kernels, which never touch it. So the modules of tadrop write `from .lazy import torch` and
use it as the module itself: the first attribute looked up imports it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class _LazyTorch:
    def __getattr__(self, name: str) -> Any:
        value = getattr(importlib.import_module("torch"), name)
        setattr(self, name, value)  # found directly from now on
        return value

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


torch: Any = _LazyTorch()


def torch_imported() -> bool:
    """Whether anything in this process has imported torch yet."""
    return "torch" in sys.modules


def is_torch_tensor(value: object) -> bool:
    """isinstance(value, torch.Tensor), without importing torch: no tensor exists before it is."""
    module = sys.modules.get("torch")
    return module is not None and isinstance(value, module.Tensor)
