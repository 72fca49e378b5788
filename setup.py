"""Install zerokit and, where a compiler and torch are present, build its C++/CUDA extension.

Install with ``pip install --no-build-isolation .`` so the build sees the torch you already
have (users bring their own CUDA build; an isolated build would download another one).
Without a compiler or torch at build time the extension is skipped here and zerokit builds it
at first use (JIT), or falls back to Python with one warning (``zerokit report`` says which).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _extension_build():
    """Return (ext_modules, cmdclass) for the csrc extension, or empty ones when unbuildable."""
    if os.environ.get("ZEROKIT_BUILD_EXTENSION", "1") == "0":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources or shutil.which(os.environ.get("CXX", "c++")) is None:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    import runpy

    # One list of flags for this build and the JIT build; torch picks the C++ standard it needs.
    flags = runpy.run_path(os.path.join("offload", "native_flags.py"))
    cxx_flags, link_flags = list(flags["CXX_FLAGS"]), list(flags["LINK_FLAGS"])
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        extension = cpp_extension.CUDAExtension(
            "zerokit._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DZEROKIT_WITH_CUDA"], "nvcc": ["-O3", "-DZEROKIT_WITH_CUDA"]},
            extra_link_args=link_flags,
        )
    else:
        extension = cpp_extension.CppExtension(
            "zerokit._C", sources, extra_compile_args=cxx_flags, extra_link_args=link_flags
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = _extension_build()

setup(
    name="zerokit",
    version="0.1.0",
    description="ZeRO sharding, offload and activation memory management for PyTorch training",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["zerokit", "zerokit.*", "offload", "offload.*", "planner", "planner.*"]),
    install_requires=[
        "torch>=2.6,<3",
        "pulp>=2.8",
        "highspy>=1.7",
        "psutil>=5.9",
        "nvidia-ml-py>=12",
        "matplotlib>=3.7",  # zerokit profile's timeline plots
        "safetensors>=0.4",  # checkpoint export
    ],
    extras_require={
        "test": ["pytest>=7", "transformers>=4.45", "peft>=0.10"],
        "hf": ["transformers>=4.45"],
        "deepspeed": ["deepspeed>=0.14"],
    },
    entry_points={"console_scripts": ["zerokit=zerokit.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
