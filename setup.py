"""Build megatron-rl and its C++/CUDA extension (megatron_rl._C).

The CPU extension is always built. The CUDA sources are added when torch is a CUDA build and
CUDA_HOME points at a toolkit, following the convention of torchvision / flash-attn:
  MEGATRON_RL_FORCE_CUDA=1 (or FORCE_CUDA=1)  build the CUDA kernels even when no GPU is visible
                                              (needs a CUDA torch and nvcc);
  MEGATRON_RL_SKIP_CUDA_BUILD=1               never build them, even on a GPU machine.
torch must already be installed (build with `pip install --no-build-isolation`): letting pip
resolve torch into an isolated build environment would download a multi-GB CUDA wheel on CPU hosts.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    force_cuda = _flag("MEGATRON_RL_FORCE_CUDA") or _flag("FORCE_CUDA")
    skip_cuda = _flag("MEGATRON_RL_SKIP_CUDA_BUILD")
    have_cuda_toolkit = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    build_cuda = not skip_cuda and have_cuda_toolkit and (force_cuda or torch.cuda.is_available())
    if force_cuda and not have_cuda_toolkit and not skip_cuda:
        raise RuntimeError(
            "MEGATRON_RL_FORCE_CUDA=1 but torch is not a CUDA build or CUDA_HOME is unset "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    if build_cuda and not os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "include",
                                                      "cuda_runtime.h")):
        # torch guesses CUDA_HOME from nvcc's folder: an nvcc in /usr/local/bin gives
        # /usr/local, whose include/ lacks the toolkit's headers, and the build fails later
        # inside a torch header with "cuda_runtime.h: No such file or directory".
        raise RuntimeError(
            f"CUDA_HOME={cpp_extension.CUDA_HOME} has no include/cuda_runtime.h: set CUDA_HOME "
            "to the CUDA toolkit's root (e.g. /usr/local/cuda), or MEGATRON_RL_SKIP_CUDA_BUILD=1"
        )

    openmp = ["-fopenmp"]
    # torch >= 2.14 headers use C++20 (concepts, <=>); older ones build with C++17 as before.
    from packaging.version import Version

    cxx_std = "-std=c++20" if Version(torch.__version__).release >= (2, 14) else "-std=c++17"
    # -fno-trapping-math lets GCC if-convert (and so vectorise) the masked exp loops of the CPU
    # kernels; nothing in the extension relies on floating-point traps.
    cxx_flags = ["-O3", cxx_std, "-march=x86-64-v2", "-fno-trapping-math"] + openmp
    if os.uname().machine != "x86_64":
        cxx_flags.remove("-march=x86-64-v2")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        return [
            cpp_extension.CUDAExtension(
                "megatron_rl._C",
                cpu_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("MEGATRON_RL_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", cxx_std, "--use_fast_math", "-lineinfo",
                             "--expt-relaxed-constexpr"],
                },
                extra_link_args=openmp,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "megatron_rl._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    ]


def _build_ext():
    from torch.utils import cpp_extension

    return cpp_extension.BuildExtension.with_options(use_ninja=True)


setup(
    name="megatron-rl",
    version="0.1.0",
    description="Pretraining-scale RL for reasoning LLMs on megatron-core, with SGLang rollouts "
    "and entropy-control losses (Clip-Cov, KL-Cov)",
    packages=find_packages(include=["megatron_rl", "megatron_rl.*"]),
    package_data={"megatron_rl": ["configs/*.yaml"]},
    python_requires=">=3.11",
    # torch is pinned loosely on purpose: the CPU wheel (2.13.0) and the GPU clusters' CUDA builds
    # both satisfy it, and a satisfied requirement never makes pip fetch a CUDA wheel on a CPU host.
    # megatron-core is pinned exactly (see README: it is installed with --ignore-requires-python on
    # Python 3.11 by ci/setup_env.sh before this package).
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.19.2",
        "numpy>=1.26",
        "packaging",
        "pyyaml>=6.0",
        "psutil>=5.9",  # undeclared dependency of megatron-core's dist_checkpointing
        "pybind11>=2.12",
        "tqdm>=4.66",
        "safetensors>=0.4",  # checkpoint conversion
        "transformers>=4.45",  # HF tokenizers and chat templates of prompt datasets
        "pyarrow>=14",  # parquet prompt datasets
        "math-verify>=0.7",  # math answer rewards
        "requests>=2.31",  # the SGLang engines' HTTP API
        "tensorboard>=2.14",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        # GPU-only; cannot install on a CPU-only host. Used automatically when importable.
        # apex: build NVIDIA/apex from source (PyPI "apex" is unrelated)
        "gpu": ["transformer-engine[pytorch]"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    entry_points={"console_scripts": ["megatron-rl-train=megatron_rl.train:main"]},
    zip_safe=False,
)
