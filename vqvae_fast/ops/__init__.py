"""Kernels and their registration as torch ops. Triton is imported only when used."""
from __future__ import annotations

import importlib.util
import os


# Looked up once: torch.compile cannot trace importlib (torch 2.11 breaks the graph on it).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the triton package can be imported (it ships with CUDA builds of torch)."""
    return _TRITON_FOUND


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
