"""Parse `nvcc -Xptxas=-v` output into {(kernel, arch): (registers, stack, spill_stores, spill_loads)}."""

from __future__ import annotations

import re
import subprocess

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse(text: str) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            out[current] = {}
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            out[current]["registers"] = int(m.group(1))
    return out


def demangle(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return res.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return list(names)


if __name__ == "__main__":
    import sys

    rep = parse(open(sys.argv[1]).read())
    keys = sorted(rep)
    for (name, arch), pretty in zip(keys, demangle([k[0] for k in keys])):
        r = rep[(name, arch)]
        short = pretty.split("(")[0].replace("protoseg::cuda::", "")
        print(f"{arch} regs={r.get('registers')} stack={r.get('stack')} spill={r.get('spill_stores')}/{r.get('spill_loads')}  {short}")
