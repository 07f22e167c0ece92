"""The compiled library: the C++ CPU kernels only, built with a C++ compiler (no CUDA toolkit)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from vqvae_fast import _extension

ROOT = Path(__file__).resolve().parent.parent


def test_compiled_library_loaded():
    assert _extension.has_compiled(), f"vqvae_fast._C did not load: {_extension.LOAD_ERROR}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vqvae_fast::quantize_fwd", "CPU")


def test_compiled_library_has_no_cuda_kernels():
    """The GPU kernels are Triton: the C++ library registers none for CUDA."""
    for op in ("nearest_code", "quantize_fwd", "quantize_bwd"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"vqvae_fast::{op}", "CUDA"), op


def test_setup_builds_only_the_cpu_extension_without_nvcc(tmp_path):
    """setup.py declares one CppExtension of C++ sources, with no CUDA toolkit on PATH and
    VQVAE_FAST_CUDA=1 set (a retired switch: ignored)."""
    code = (
        "import sys, setuptools\n"
        "from torch.utils import cpp_extension\n"
        "captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "sys.argv = ['setup.py']\n"
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})\n"
        "[ext] = captured['ext_modules']\n"
        "assert ext.name == 'vqvae_fast._C', ext.name\n"
        "assert all(s.endswith('.cpp') for s in ext.sources) and 'csrc/ops.cpp' in ext.sources, ext.sources\n"
        "assert any(s.startswith('csrc/cpu/') for s in ext.sources), ext.sources\n"
        "assert not any('cuda' in s for s in ext.sources), ext.sources\n"
        "assert ext.extra_compile_args == {'cxx': ['-O3', '-fopenmp']}, ext.extra_compile_args\n"
        "assert 'cudart' not in ext.libraries and 'c10_cuda' not in ext.libraries, ext.libraries\n"
    )
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin",
               VQVAE_FAST_CUDA="1", CUDA_HOME=str(tmp_path / "no-cuda-here"))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


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
