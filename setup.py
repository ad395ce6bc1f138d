"""Installs megatron_conan.

The CUDA soft-mask attention extension (csrc/) is built only where CUDA is present (a visible GPU,
or CUDA_ARCHS naming the architectures to build for, e.g. "90a", with a CUDA build of torch and
nvcc); set MEGATRON_CONAN_SKIP_CUDA_EXT=1 to skip it anyway. MAX_JOBS sets the parallel compiles.
Transformer Engine and Apex are optional GPU fast paths and never required.
"""

import os

from setuptools import find_packages, setup


def _cuda_architectures(cuda_home):
    """The architectures this nvcc can build (sm_80, sm_86, sm_89, sm_90a, sm_100 as the toolkit
    allows; the table is in the package's cuda_binding.py, loaded by path: the package is not
    installed yet): the define that records them in the binding, and their -gencode flags."""
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location(
        "_conan_cuda_binding", os.path.join("megatron_conan", "ops", "soft_mask_attention", "cuda_binding.py"))
    binding = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(binding)
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    version = binding.parse_nvcc_version(subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                                        check=True).stdout)
    archs = binding.architectures_for_toolkit(version)
    wanted = os.environ.get("CUDA_ARCHS", "").split()  # e.g. "90a": only the GPU at hand (a quicker build)
    if wanted:
        archs = [arch for arch in archs if arch in wanted]
    if not archs:
        raise SystemExit(f"nvcc {version[0]}.{version[1]} is older than CUDA 11.0: it cannot build the "
                         "soft-mask extension (set MEGATRON_CONAN_SKIP_CUDA_EXT=1 to skip it)")
    return binding.archs_define(archs), binding.gencode_flags(archs)


def _cuda_extensions():
    """The torch CUDA extensions under csrc/, or [] where CUDA is absent or skipping is asked for."""
    if os.environ.get("MEGATRON_CONAN_SKIP_CUDA_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    # CUDA_ARCHS names the GPU to build for, so a machine without one (a login node, the CPU
    # rehearsal) can build ahead of the GPU check
    if CUDA_HOME is None or torch.version.cuda is None or not (
            torch.cuda.is_available() or os.environ.get("CUDA_ARCHS", "").strip()):
        return [], {}
    sources = [os.path.join("csrc", name) for name in sorted(os.listdir("csrc"))
               if name.endswith((".cu", ".cpp"))]
    if not sources:
        return [], {}
    archs_define, gencode = _cuda_architectures(CUDA_HOME)
    extension = CUDAExtension(
        name="megatron_conan_soft_mask_cuda",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", archs_define],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", archs_define, *gencode],
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
        "torch>=2.11",  # the GPU node's (benchmarks/gpu_node_inventory.txt), proven by make gpu-rehearsal
        "megatron-core==0.16.1",
        "psutil",  # megatron-core's async checkpoint writer hangs without it (undeclared there)
        "numpy",
        "sentencepiece",
        "protobuf",  # sentencepiece's model proto, read by the per-word encoding cache
        "pyyaml",
        "pydantic>=2.7",  # typed loading of the run configs (config/loader.py)
        "pybind11",
        "tqdm",
        "zstandard",
        "tensorboard",
        # export and evaluation (docs/DESIGN.md section 10): transformers >= 5.2 reads "is_causal": false, so an
        # exported LlamaModel attends bidirectionally with no custom code; the floors of torch, transformers,
        # sentence-transformers and triton are the GPU node's versions, which make gpu-rehearsal runs on
        "transformers>=5.17",
        "sentence-transformers>=6.0",
        "safetensors",
        "mteb>=2.0",
        "pytrec-eval-terrier",  # the metrics MTEB itself computes
        "bm25s",
        "matplotlib",
    ],
    extras_require={
        # the CPU test environment (make install): triton held below 3.10 so the suite runs its kernels
        # under TRITON_INTERPRET on the release it was written against (3.9), while still admitting
        # the node's 3.6 that the GPU rehearsal proved (the runtime floor below)
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "triton>=3.6,<3.10"],
        "triton": ["triton>=3.6"],
        # approximate nearest-neighbour search for hard-negative mining over millions of passages
        # (datagen/mining.py; exact search stays the default below a million texts)
        "ann": ["faiss-cpu>=1.8"],
    },
    entry_points={"console_scripts": [
        "conan-pretrain=megatron_conan.training.pretrain:main",
        "conan-sft=megatron_conan.training.sft:main",
        "conan-embed-weak=megatron_conan.training.embed_weak:main",
        "conan-embed-sup=megatron_conan.training.embed_sup:main",
        "conan-encode=megatron_conan.eval.encode:main",
        "conan-eval=megatron_conan.eval.retrieval_cli:main",
        "conan-train-tokenizer=megatron_conan.cli.train_tokenizer:main",
        "conan-preprocess=megatron_conan.cli.preprocess:main",
        "conan-tokenize-contrastive=megatron_conan.cli.tokenize_contrastive:main",
        "conan-sft-to-pairs=megatron_conan.cli.sft_to_pairs:main",
        "conan-build-clr=megatron_conan.cli.build_clr:main",
        "conan-build-pydoc-corpus=megatron_conan.cli.build_pydoc_corpus:main",
        "conan-mine=megatron_conan.cli.mine:main",
        "conan-convert=megatron_conan.cli.convert:main",
        "conan-gpu-check=megatron_conan.cli.gpu_check:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
