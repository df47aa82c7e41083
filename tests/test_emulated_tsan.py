"""The emulated CUDA kernels under ThreadSanitizer: tests/emulated/tsan_main.cpp, built once with
-fsanitize=thread against libtorch (CPU), runs every kernel on several blocks through the CPU
grid executor, whose emulated CUDA threads are real threads. Any data race fails the test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EMU = os.path.join(HERE, "emulated")


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or _compiler() is None, reason="needs g++ on Linux")
def test_emulated_kernels_have_no_data_race(tmp_path):
    torch_dir = os.path.dirname(torch.__file__)
    lib = os.path.join(torch_dir, "lib")
    out_dir = os.path.join(ROOT, "build", "tsan")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, "tsan_kernels")
    sources = [os.path.join(EMU, "tsan_main.cpp")]
    deps = sources + [os.path.join(EMU, "grid_executor.h"), os.path.join(EMU, "emu_exec.h")] + [
        os.path.join(ROOT, "csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
    ] + [os.path.join(ROOT, "csrc", "checks.h")]
    stale = not os.path.exists(exe) or os.path.getmtime(exe) < max(os.path.getmtime(f) for f in deps)
    if stale:
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        # -g1: line tables only, enough for file:line in a race report; full -g triples the compile.
        cmd = [
            _compiler(), "-std=c++20", "-O1", "-g1", "-fsanitize=thread", "-pthread",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            "-I", os.path.join(ROOT, "csrc"), "-I", EMU,
            "-I", os.path.join(torch_dir, "include"),
            "-I", os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"),
            *sources, "-o", exe,
            "-L", lib, "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}",
        ]
        subprocess.run(cmd, check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1")
    res = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=600)
    report = res.stdout + res.stderr
    assert "ThreadSanitizer" not in report, report[-20000:]
    assert res.returncode == 0, report[-20000:]
    assert report.startswith("OK"), report


@pytest.mark.skipif(not sys.platform.startswith("linux") or _compiler() is None, reason="needs g++ on Linux")
def test_tsan_sees_a_missing_syncthreads(tmp_path):
    """Negative control: the same executor under TSan reports a kernel that reads a neighbour's
    shared-memory slot without __syncthreads, and stays quiet once the barrier is there."""
    exe = str(tmp_path / "tsan_control")
    cmd = [_compiler(), "-std=c++20", "-O1", "-g1", "-fsanitize=thread", "-pthread",
           "-I", os.path.join(ROOT, "csrc"), "-I", EMU, os.path.join(EMU, "tsan_control.cpp"), "-o", exe]
    subprocess.run(cmd, check=True)
    env = dict(os.environ, TSAN_OPTIONS="exitcode=66")
    race = subprocess.run([exe, "race"], capture_output=True, text=True, env=env, timeout=300)
    assert "WARNING: ThreadSanitizer: data race" in race.stderr and race.returncode == 66, race.stderr[-4000:]
    clean = subprocess.run([exe, "sync"], capture_output=True, text=True, env=env, timeout=300)
    assert "ThreadSanitizer" not in clean.stderr and clean.returncode == 0, clean.stderr[-4000:]
