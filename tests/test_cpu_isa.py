"""The CPU kernels' instruction-set dispatch (csrc/cpu/kernels.h): one built library holds a
baseline, an AVX2 and an AVX-512 build of the vectorised kernels, runs the one ATen chose
(ATEN_CPU_CAPABILITY forces a lower one), and every build computes the same thing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import protoseg._C as _C

ROOT = Path(__file__).resolve().parents[1]
ISA_OF_CAPABILITY = {"AVX512": "avx512", "AVX2": "avx2", "DEFAULT": "default"}


def _run(env_capability: str | None, code: str) -> str:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if env_capability is not None:
        env["ATEN_CPU_CAPABILITY"] = env_capability
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_kernels_follow_atens_capability():
    assert _C.cpu_isa() == ISA_OF_CAPABILITY[torch.backends.cpu.get_cpu_capability()]
    code = "import torch, protoseg._C as C; print(torch.backends.cpu.get_cpu_capability(), C.cpu_isa())"
    reported = {}
    for forced in ("default", "avx2"):
        reported[forced], ours = _run(forced, code).split()
        assert ours == ISA_OF_CAPABILITY[reported[forced]]  # whatever ATen chose (no AVX2: the default path)
    assert reported["default"] == "DEFAULT"  # every CPU can be forced down to the baseline


@pytest.mark.slow
def test_lower_paths_pass_the_op_tests():
    """The forward and backward op tests against the reference, on each forced path below this
    CPU's widest (which runs them in tests/test_ops.py itself). The paths run side by side, one
    thread each: they are independent processes."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    lower = [c for c in ("avx2", "default") if c.upper() != torch.backends.cpu.get_cpu_capability()]
    capabilities = [c for c in lower if _run(c, probe) == c.upper()]
    if not capabilities:
        pytest.skip("the baseline is this CPU's widest path: tests/test_ops.py runs it")
    selection = "test_proto_train or test_proto_similarity or layer_norm or thread"
    runs = {c: subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_ops.py"),
         "-k", selection],
        env=dict(os.environ, ATEN_CPU_CAPABILITY=c, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT) for c in capabilities}
    for capability, run in runs.items():
        stdout, stderr = run.communicate(timeout=1800)
        assert run.returncode == 0, f"{capability}: {stdout[-4000:]}{stderr[-2000:]}"
        assert re.search(r"\d+ passed", stdout), capability


@pytest.mark.skipif(shutil.which("objdump") is None or not sys.platform.startswith("linux"),
                    reason="needs binutils' objdump")
def test_only_the_dispatched_builds_use_wide_vectors():
    """No function outside protoseg::cpu::avx2 / ::avx512 uses a ymm or zmm register, so the
    library runs on any x86-64 CPU (no inline function was compiled for AVX behind its back)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("not an x86-64 CPU with AVX2")
    library = Path(_C.__file__)
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(library)], capture_output=True,
                             text=True, check=True).stdout
    users, zmm_users, current = set(), set(), None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = header.group(1)
        elif current and ("%ymm" in line or "%zmm" in line):
            users.add(current)
            if "%zmm" in line:
                zmm_users.add(current)
    assert users, "no function uses AVX registers: the AVX2/AVX-512 builds are missing"
    outside = sorted(u for u in users if "protoseg::cpu::avx2::" not in u and "protoseg::cpu::avx512::" not in u)
    assert not outside, f"AVX code outside the dispatched kernels: {outside[:5]}"
    assert any("protoseg::cpu::avx512::" in u for u in zmm_users), "the AVX-512 build uses no zmm register"
