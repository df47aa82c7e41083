"""Checks of the CUDA build that need no GPU (docs/design.md section 5):

- the built protoseg._C carries cubins for every architecture in TORCH_CUDA_ARCH_LIST (default
  sm_75, sm_80, sm_86, sm_90) and PTX for the newest (cuobjdump --list-elf / --list-ptx);
- every protoseg op and backward op has a CUDA kernel registered;
- every kernel the host side can launch exists in every cubin, and in the cubins of the very
  object file whose host code launches it (nvcc gives kernel templates' host stubs internal
  linkage; the .cu files hide their host side from the device passes, see csrc/cuda/common.cuh,
  so this is checked, not assumed); no kernel is compiled in two objects;
- no kernel of any built cubin uses a stack frame or local memory (cuobjdump's STACK:0 LOCAL:0),
  so none spills registers: ptxas puts spilled registers in the stack frame. (To see registers
  and spills per kernel while tuning: `nvcc -cubin -Xptxas=-v` on a csrc/cuda/*.cu file, read
  by tests/emulated/ptxas_report.py.)

They run whenever the build is expected to include CUDA (a CUDA build of torch and a toolkit,
as in `make test`); they skip, saying why, only where no CUDA toolkit exists at all.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

import protoseg

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "emulated"))
import ptxas_report  # noqa: E402

import protoseg.ops  # noqa: E402,F401  (declares every schema)

# Every schema csrc/protoseg.cpp declares, from the dispatcher (a new op is covered without a list).
OPS = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("protoseg::"))
DEFAULT_ARCHS = "7.5;8.0;8.6;9.0+PTX"


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    for cand in sorted(glob.glob("/usr/local/cuda*")):
        if os.path.exists(os.path.join(cand, "lib64", "libcudart.so")) and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


CUDA_HOME = _cuda_home()
pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or CUDA_HOME is None or os.environ.get("PROTOSEG_CUDA") == "0",
    reason="no CUDA toolkit / CPU-only torch: protoseg._C is built without CUDA here",
)


def _tool(name):
    for cand in (os.path.join(CUDA_HOME or "", "bin", name), shutil.which(name)):
        if cand and os.path.exists(cand):
            return cand
    try:
        import triton

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    pytest.fail(f"{name} not found (CUDA_HOME/bin, PATH, triton/backends/nvidia/bin)")


def _library():
    libs = glob.glob(os.path.join(os.path.dirname(protoseg.__file__), "_C*.so"))
    assert libs, "protoseg._C is not built"
    return libs[0]


def _expected_archs():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS).replace(",", ";").replace(" ", ";")
    cubins, ptx = set(), set()
    for a in filter(None, archs.split(";")):
        num = a.replace("+PTX", "").replace(".", "")
        cubins.add(f"sm_{num}")
        if a.endswith("+PTX"):
            ptx.add(f"sm_{num}")
    return cubins, ptx


def _cuobjdump(*args, path=None):
    return subprocess.run([_tool("cuobjdump"), *args, path or _library()], capture_output=True, text=True,
                          check=True).stdout


def test_library_carries_cubins_and_ptx():
    cubins, ptx = _expected_archs()
    elf = set(re.findall(r"\.(sm_\d+a?)\.cubin", _cuobjdump("--list-elf")))
    assert cubins <= elf, f"cubins {sorted(elf)} lack {sorted(cubins - elf)}"
    found_ptx = set(re.findall(r"\.(sm_\d+a?)\.ptx", _cuobjdump("--list-ptx")))
    assert ptx <= found_ptx, f"PTX {sorted(found_ptx)} lacks {sorted(ptx - found_ptx)}"


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"protoseg::{op}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"protoseg::{op}", "CUDA"), f"{op} has no CUDA kernel"


def _cubin_kernels(path=None):
    """{arch: {mangled kernel name: {'REG':.., 'STACK':.., 'LOCAL':..}}} from the built library (or an object)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    arch = None
    for line in _cuobjdump("--dump-resource-usage", path=path).splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            out.setdefault(arch, {})
            continue
        m = re.search(r"Function (\S+):", line)
        if m and arch:
            fields = dict((k, int(v)) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line))
            out[arch][m.group(1)] = fields
    return out


def _host_stubs(path=None):
    """Kernels the host code registers (nvcc's __device_stub__ functions), in the library or an object."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    syms = subprocess.run([nm, path or _library()], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in syms.splitlines():
        m = re.search(r"__device_stub__(Z\S+)", line)
        if m:
            names.add("_" + m.group(1))
    return names


def test_every_launchable_kernel_is_in_every_cubin():
    kernels = _cubin_kernels()
    cubins, _ = _expected_archs()
    assert cubins <= set(kernels), f"resource usage lists {sorted(kernels)}"
    stubs = {s for s in _host_stubs() if "protoseg" in s}
    assert stubs, "no protoseg kernel stubs found in the library's symbol table"
    for arch in sorted(cubins):
        missing = {s for s in stubs if not any(s in k or k in s for k in kernels[arch])}
        assert not missing, f"{arch} lacks device code for {sorted(ptxas_report.demangle(sorted(missing)))}"


def _cuda_objects():
    objs = sorted(glob.glob(os.path.join(ROOT, "build", "temp*", "csrc", "cuda", "*.o")))
    objs = [o for o in objs if os.path.exists(os.path.join(ROOT, "csrc", "cuda", os.path.basename(o)[:-2] + ".cu"))]
    if not objs:
        pytest.skip("no CUDA object files under build/ (protoseg._C was not built in this tree)")
    return objs


def test_each_kernel_lives_in_the_one_object_that_launches_it():
    owner: dict[str, str] = {}
    for obj in _cuda_objects():
        name = os.path.basename(obj)
        kernels = _cubin_kernels(obj)
        stubs = {s for s in _host_stubs(obj) if "protoseg" in s}
        for arch, found in kernels.items():
            missing = {s for s in stubs if not any(k in s for k in found)}
            assert not missing, f"{name} launches kernels its own {arch} cubin lacks: {ptxas_report.demangle(sorted(missing))}"
        for kernel in set().union(*kernels.values()) if kernels else ():
            assert kernel not in owner, f"{ptxas_report.demangle([kernel])[0]} is compiled in {owner.get(kernel)} and {name}"
            owner[kernel] = name
    assert owner, "no protoseg kernels in the CUDA objects"


def test_built_kernels_spill_nothing_and_use_no_local_memory():
    for arch, kernels in _cubin_kernels().items():
        bad = {k: v for k, v in kernels.items() if "protoseg" in k and (v.get("LOCAL", 0) or v.get("STACK", 0))}
        assert not bad, f"{arch}: kernels with stack/local memory: {bad}"
