"""Builds the test-only emulated-kernel module (tests/emulated/emulated_ops.cpp) once per
session with torch.utils.cpp_extension.load; the objects are cached under build/emulated."""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
FLAGS = ["-O2", "-std=c++20", "-pthread"]


def load():
    from torch.utils import cpp_extension

    build_dir = os.path.join(ROOT, "build", "emulated")
    os.makedirs(build_dir, exist_ok=True)
    return cpp_extension.load(
        name="protoseg_emulated",
        sources=[os.path.join(HERE, "emulated_ops.cpp")],
        extra_include_paths=[CSRC, HERE],
        extra_cflags=FLAGS,
        extra_ldflags=["-pthread"],
        build_directory=build_dir,
        verbose=False,
    )


if __name__ == "__main__":
    import time

    t = time.time()
    load()
    print(f"built in {time.time() - t:.1f} s")
