"""CMakeLists.txt builds the same operator library against libtorch, and the ops work when a
fresh process loads it with torch.ops.load_library (no protoseg Python package involved)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
torch.manual_seed(0)
x = torch.randn(300, 8, dtype=torch.float64)
p = torch.randn(3, 4, 8, dtype=torch.float64)
scores, index = torch.ops.protoseg.proto_similarity(x, p)
xn = torch.nn.functional.normalize(x, dim=-1)
pn = torch.nn.functional.normalize(p, dim=-1)
sim = torch.einsum("nd,kmd->nkm", xn, pn)
assert torch.allclose(scores, sim.amax(dim=2)), "proto_similarity disagrees"
assert torch.equal(index, sim.argmax(dim=2)), "argmax disagrees"
labels = torch.randint(-1, 3, (300,))
q, a = torch.ops.protoseg.sinkhorn(sim[torch.arange(300), labels.clamp(min=0)], labels, 3, 3, 0.05)
assert torch.allclose(q[labels >= 0].sum(dim=1), torch.ones(int((labels >= 0).sum()))), "sinkhorn rows"
mean, count = torch.ops.protoseg.scatter_mean(x, labels, 3)
assert torch.equal(count, torch.bincount(labels[labels >= 0], minlength=3)), "scatter_mean counts"
try:
    torch.ops.protoseg.proto_similarity(x, p[:, :, :5])
except RuntimeError as e:
    assert "prototypes must be [K, M, D]" in str(e), str(e)
else:
    raise AssertionError("mismatched D was accepted")
print("ok")
"""


@pytest.mark.slow
def test_cmake_library_loads_and_runs(tmp_path):
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    if not Path(cmake).exists():
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    # A CUDA build of torch makes its CMake config look for the toolkit, and for an architecture
    # list since no GPU is visible; the library itself links only torch_cpu and c10.
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0"}
    # Unoptimised and without debug info: this checks that the library builds and its ops load and
    # run, not their speed, and -O0 compiles in a fraction of Release's time.
    configure = [cmake, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS_DEBUG=-O0"]
    if torch.version.cuda and os.environ.get("CUDA_HOME"):
        configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={os.environ['CUDA_HOME']}")
    for cmd in (configure, [cmake, "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    library = build / "libprotoseg_ops.so"
    assert library.exists()
    out = subprocess.run([sys.executable, "-c", CHILD, str(library)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
