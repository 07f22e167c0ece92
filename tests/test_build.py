"""The compiled library: always built with its CPU kernels; with CUDA kernels wherever nvcc is."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from vqvae_fast import _extension


def test_compiled_library_loaded():
    assert _extension.has_compiled(), f"vqvae_fast._C did not load: {_extension.LOAD_ERROR}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vqvae_fast::quantize_fwd", "CPU")


def _nvcc_major():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    match = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return match.group(1) if match else None


def test_cuda_kernels_built_when_nvcc_is_present():
    nvcc_major = _nvcc_major()
    if nvcc_major is None or torch.version.cuda is None or os.environ.get("VQVAE_FAST_CUDA") == "0":
        pytest.skip("no nvcc, or a CPU-only torch, or VQVAE_FAST_CUDA=0: the build skips the CUDA kernels")
    if nvcc_major != torch.version.cuda.split(".")[0]:
        pytest.skip(f"nvcc is CUDA {nvcc_major} but torch is CUDA {torch.version.cuda}: CUDA kernels not built")
    assert _extension.has_cuda_kernels(), "nvcc is here, yet vqvae_fast._C has no CUDA kernels"


def test_package_works_without_the_compiled_library():
    """If _C cannot load: one clear warning, and backend='auto' still answers on the CPU."""
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['vqvae_fast._C'] = None  # makes `from . import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import vqvae_fast\n"
        "messages = [str(w.message) for w in caught if 'vqvae_fast' in str(w.message)]\n"
        "assert len(messages) == 1 and 'compiled extension could not be loaded' in messages[0], messages\n"
        "z, e = torch.randn(50, 4), torch.randn(9, 4)\n"
        "assert torch.equal(vqvae_fast.nearest_code(z, e), torch.cdist(z.double(), e.double()).argmin(1))\n"
        "try:\n"
        "    vqvae_fast.nearest_code(z, e, backend='cpu')\n"
        "except RuntimeError as error:\n"
        "    assert 'unavailable' in str(error)\n"
        "else:\n"
        "    raise AssertionError('backend=cpu should fail without the library')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
