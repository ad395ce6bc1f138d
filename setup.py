"""Installs megatron_conan.

The CUDA soft-mask attention extension (csrc/) is built only where CUDA is present; set
MEGATRON_CONAN_SKIP_CUDA_EXT=1 to skip it anyway. Transformer Engine and Apex are optional GPU fast
paths and never required.
"""

import os

from setuptools import find_packages, setup


def _cuda_extensions():
    """The torch CUDA extensions under csrc/, or [] where CUDA is absent or skipping is asked for."""
    if os.environ.get("MEGATRON_CONAN_SKIP_CUDA_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or not torch.cuda.is_available():
        return [], {}
    sources = [os.path.join("csrc", name) for name in sorted(os.listdir("csrc"))
               if name.endswith((".cu", ".cpp"))]
    if not sources:
        return [], {}
    extension = CUDAExtension(
        name="megatron_conan_soft_mask_cuda",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                     "-gencode=arch=compute_90a,code=sm_90a",
                     "-gencode=arch=compute_80,code=sm_80"],
        },
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="megatron_conan",
    version="0.1.0",
    description="Conan-Embedding-v2 training system on megatron-core",
    packages=find_packages(include=["megatron_conan", "megatron_conan.*"]),
    package_data={"megatron_conan": ["**/*.md", "**/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",  # megatron-core's async checkpoint writer hangs without it (undeclared there)
        "numpy",
        "sentencepiece",
        "pyyaml",
        "pybind11",
        "tqdm",
        "zstandard",
        "tensorboard",
        # export and evaluation (DESIGN.md 7b): transformers >= 5.2 reads "is_causal": false, so an
        # exported LlamaModel attends bidirectionally with no custom code
        "transformers>=5.2",
        "sentence-transformers>=6.2",
        "safetensors",
        "mteb>=2.0",
        "pytrec-eval-terrier",  # the metrics MTEB itself computes
        "bm25s",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "triton==3.9.0"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": [
        "conan-pretrain=megatron_conan.training.pretrain:main",
        "conan-sft=megatron_conan.training.sft:main",
        "conan-embed-weak=megatron_conan.training.embed_weak:main",
        "conan-embed-sup=megatron_conan.training.embed_sup:main",
        "conan-encode=megatron_conan.eval.encode:main",
        "conan-eval=megatron_conan.eval.retrieval_cli:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
