"""Builds protoseg._C: the CPU operator library, plus the CUDA kernels where a toolkit exists.

Environment:
  PROTOSEG_CUDA=0        never build CUDA sources
  FORCE_CUDA=1           build CUDA sources even when torch cannot see a GPU
  TORCH_CUDA_ARCH_LIST   architectures to build for (default "7.5;8.0;8.6;9.0+PTX")

The CPU kernels are compiled for baseline x86-64, AVX2 and AVX-512 and chosen at run time
(csrc/cpu/kernels.h), so the library runs on any x86-64 CPU whatever machine built it.
`python setup.py build_ext --inplace` (what `make build` runs) rebuilds with ninja in build/:
only what changed since the last build is compiled again.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;8.6;9.0+PTX"


def cuda_wanted():
    if os.environ.get("PROTOSEG_CUDA") == "0":
        return False
    sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if not sources:
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    with_cuda = cuda_wanted()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -g0: Python's build flags add -g, which on these template-heavy sources triples the compile
    # time (30 s against 11 s of CPU for csrc/cpu/proto_train.cpp) and makes the objects 25x larger.
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-DPROTOSEG_PYTHON_MODULE"]
    # Headers too, so that build_ext skips the extension only when nothing it is built from changed.
    headers = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    headers += sorted(glob.glob(os.path.join("csrc", "**", "*.cuh"), recursive=True))
    kwargs = dict(
        name="protoseg._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        depends=headers,
    )
    if not with_cuda:
        print("protoseg: building CPU kernels only", flush=True)
        return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-DPROTOSEG_CUDA"]
    include_dirs = kwargs.pop("include_dirs")
    # torch's CUDA headers include cublas_v2.h, cusparse.h ...; pip ships them here.
    nvidia_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    if os.path.isdir(nvidia_include):
        include_dirs.append(nvidia_include)
    print(f"protoseg: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
    return cpp_extension.CUDAExtension(
        sources=sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + ["-DPROTOSEG_CUDA"], "nvcc": nvcc},
        **kwargs,
    )


setup(
    name="protoseg",
    version="0.1.0",
    packages=find_packages(include=["protoseg", "protoseg.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
