"""One command for the first GPU: build protoseg for this machine's GPU, run its CUDA tests,
benchmarks, short trainings, a 1-process NCCL run and the CUDA sanitizers, and write a report.

    python tools/gpu_check.py OUT [--budget SECONDS]       (make gpu-check OUT=dir)

For a machine with an NVIDIA GPU and a CUDA build of torch >= 2.4 already installed; needs no
network and installs nothing. The tree (csrc, protoseg, tools, tests, benchmarks, configs,
setup.py) is copied to OUT/tree and built there for the GPU's architecture only, so the
checkout and its own build stay untouched and every step imports the library just built.

Each step is a subprocess with its own time limit and its output in OUT/<step>.log; a step
that fails or runs out of time is recorded and the next one runs. All steps together stay
within --budget seconds (a step gets at most what is left). OUT/report.json and
OUT/report.md are rewritten (atomically) after every step; docs/gpu_check.md describes them.

Exit status: 0 every step passed (or was skipped with a reason), 1 some step failed,
2 no usable GPU (one line, before anything else is done).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_NO_GPU = 2
DEFAULT_BUDGET = 560  # seconds: one device command's 10 minutes, less start-up and the report
MIN_STEP = 10  # seconds: a step that would get less is skipped rather than started
TREE = ["setup.py", "pyproject.toml", "csrc", "protoseg", "tools", "tests", "benchmarks", "configs"]
CONFIG = "configs/digitscenes_protoseg.yaml"
TRAIN_ITERATIONS = 200
# compute-sanitizer slows every kernel by orders of magnitude: the op tests at their small sizes
# only (tests/test_cuda.py: size3/size4 are 4099 x 720 and K = 847; n = 1048576; 3M x 720).
# benchmarks/test_train_step.py on the GPU: the paper configs' whole training step, batch 2 at crop 512
TRAIN_STEP_ENV = {"PROTOSEG_BENCH_STEP": "2,512", "PROTOSEG_BENCH_STEP_SETTINGS": "fp32,bf16-cl,compiled-bf16-cl",
                  "PROTOSEG_BENCH_ROUNDS": "3"}
SMALL_TESTS = "not 1048576 and not 64bit and not size3 and not size4"
FAILED = ("failed", "timeout")


def no_gpu_reason() -> str:
    """Why this machine cannot run the check, or "" when it can. Imports torch only."""
    try:
        import torch
    except ImportError as e:
        return f"torch cannot be imported ({e})"
    from torch.torch_version import TorchVersion

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    with warnings.catch_warnings():  # "CUDA initialization: ..." would be a second line
        warnings.simplefilter("ignore")
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device"
    if TorchVersion(torch.__version__) < "2.4":
        return f"torch {torch.__version__} is older than 2.4"
    return ""


def _atomic_write():
    """protoseg.engine.checkpoint.atomic_write, loaded from its file: importing the protoseg
    package loads the compiled library, which this script is there to build."""
    path = os.path.join(ROOT, "protoseg", "engine", "checkpoint.py")
    spec = importlib.util.spec_from_file_location("_protoseg_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.atomic_write


def write_text(path: str, text: str) -> None:
    _atomic_write()(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------- steps


class CheckFailed(Exception):
    """Raised by a step's parser: the command exited 0 but did not do what the step checks."""


@dataclass
class Step:
    name: str
    command: list[str]
    limit: float  # seconds
    cwd: str = ROOT
    env: dict[str, str | None] = field(default_factory=dict)  # None removes the variable
    parse: Callable[[str], dict] | None = None  # (log path) -> figures; may raise CheckFailed
    skip: str = ""  # reason not to run it
    partial_ok: bool = False  # a time-out that still yields figures is "stopped", not a failure
    note: str = ""


def run_step(step: Step, out: str, seconds_left: float) -> dict:
    """Run `step` with its output in OUT/<name>.log; the result as report.json holds it."""
    result = {"name": step.name, "status": "skipped", "command": shlex.join(step.command),
              "limit_s": round(min(step.limit, seconds_left)), "duration_s": 0.0, "returncode": None,
              "log": f"{step.name}.log", "figures": {}, "note": step.note}
    if step.skip or seconds_left < MIN_STEP:
        result["note"] = step.skip or f"not started: {seconds_left:.0f} s of the time budget left"
        result["log"] = None
        return result
    env = dict(os.environ)
    for key, value in step.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    start = time.monotonic()
    with open(os.path.join(out, result["log"]), "wb") as log:
        log.write(f"$ {result['command']}\n".encode())
        log.flush()
        # A session of its own, so that a time-out kills its children too (torchrun's workers,
        # the program under compute-sanitizer, ninja's compilers).
        try:
            proc = subprocess.Popen(step.command, cwd=step.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            result.update(status="failed", note=join_notes(step.note, f"could not start: {e}"))
            return result
        try:
            result["returncode"] = proc.wait(timeout=result["limit_s"])
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result["duration_s"] = round(time.monotonic() - start, 1)
    timed_out = result["returncode"] is None
    result["status"] = "timeout" if timed_out else "passed" if result["returncode"] == 0 else "failed"
    if step.parse is not None:  # failed steps too: which tests failed, how many sanitizer errors
        try:
            result["figures"] = step.parse(os.path.join(out, result["log"]))
        except CheckFailed as e:
            result["status"], result["note"] = "failed", join_notes(result["note"], str(e))
        except Exception as e:  # a log not as expected is this step's failure, never the whole check's
            result["note"] = join_notes(result["note"], f"figures not read: {e}")
            if result["status"] == "passed":
                result["status"] = "failed"
    if timed_out:
        stopped = step.partial_ok and result["figures"]
        result["status"] = "stopped" if stopped else "timeout"
        result["note"] = join_notes(result["note"], f"stopped at its time limit of {result['limit_s']} s")
    return result


def join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def junit_figures(path: str) -> dict:
    """Test counts from a pytest --junitxml file; none run (all skipped, or none selected) is
    a failure: on a GPU, tests/test_cuda.py skips nothing but what needs more memory."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if counts["tests"] == counts["skipped"]:
        raise CheckFailed(f"no test ran ({counts['tests']} collected, {counts['skipped']} skipped)")
    return counts


def sanitizer_figures(log_path: str, junit: str) -> dict:
    """compute-sanitizer's error (memcheck) or hazard (racecheck) count, with the test counts."""
    text = read_text(log_path)
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", text)
    if not errors and not hazards:
        raise CheckFailed("no compute-sanitizer summary in the log")
    figures = {"sanitizer_errors": sum(map(int, errors))} if errors else {"hazards": sum(map(int, hazards))}
    return {**figures, **junit_figures(junit)}


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def training_figures(run_dir: str) -> dict:
    """From a run folder (protoseg/engine/trainer.py writes log.jsonl and eval_results.json):
    iterations done, wall seconds of the loop, iterations/s over the whole loop and after
    the first logged step (start-up, cuDNN and allocator warm-up), and the final val mIoU
    (None if the run stopped before its evaluation)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    if not steps:
        raise ValueError(f"{run_dir}/log.jsonl holds no training step")
    first, last = steps[0], steps[-1]
    figures = {"iterations": last["iter"], "seconds": last["time"],
               "iterations_per_s": round(last["iter"] / last["time"], 3) if last["time"] > 0 else None,
               "steady_iterations_per_s": None, "mIoU": None}
    if last["time"] > first["time"]:
        steady = (last["iter"] - first["iter"]) / (last["time"] - first["time"])
        figures["steady_iterations_per_s"] = round(steady, 3)
    results = os.path.join(run_dir, "eval_results.json")
    if os.path.exists(results):
        figures["mIoU"] = read_json(results)["mIoU"]
    return figures


def torchrun_figures(log_path: str, run_dir: str) -> dict:
    """The backend the trainer reports ("... rank(s) on cuda:0 (nccl)") and the replica check
    of its checkpoint; a run that is not NCCL fails the step."""
    text = read_text(log_path)
    found = re.search(r"rank\(s\) on (\S+) \((\w+)\)", text)
    backend = found.group(2) if found else None
    if backend != "nccl":
        raise CheckFailed(f"the trainer ran with backend {backend} (expected nccl)")
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        saved = [r for r in map(json.loads, f) if "checkpoint" in r]
    return {"backend": backend, "device": found.group(1),
            "replicas_identical": saved[-1]["replicas_identical"] if saved else None,
            **training_figures(run_dir)}


def find_sanitizer() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("compute-sanitizer")]
    if CUDA_HOME:
        candidates += [os.path.join(CUDA_HOME, "bin", "compute-sanitizer"),
                       os.path.join(CUDA_HOME, "compute-sanitizer", "compute-sanitizer")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def plan(out: str, machine: dict) -> list[Step]:
    """The steps, in order, each reading what the earlier ones left in OUT."""
    py, tree = sys.executable, os.path.join(out, "tree")
    env = {"PYTHONPATH": tree}
    build_env = {**env, "TORCH_CUDA_ARCH_LIST": machine["capability"], "MAX_JOBS": str(machine["cpu_count"]),
                 "FORCE_CUDA": "1", "PROTOSEG_CUDA": None}
    if not os.environ.get("CUDA_HOME"):  # the Makefile exports it empty when it finds no toolkit
        build_env["CUDA_HOME"] = None

    def built_for_gpu(log):
        text = read_text(log)
        if f"building CPU and CUDA kernels for {machine['capability']}" not in text:
            raise CheckFailed("setup.py did not build the CUDA kernels for this GPU's architecture")
        return {"architecture": machine["capability"], "jobs": machine["cpu_count"],
                "library": os.path.relpath(glob.glob(os.path.join(tree, "protoseg", "_C*.so"))[0], out)}

    def pytest_step(name, tests, limit, prefix=(), parse=None, skip="", k=""):
        junit = os.path.join(out, f"{name}.xml")
        command = [*prefix, py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
        return Step(name, command + (["-k", k] if k else []), limit, tree, env, skip=skip,
                    parse=parse or (lambda log: junit_figures(junit)))

    def train_step(name, limit, amp, device_env=None, partial_ok=False, note=""):
        run_dir = os.path.join(out, name)
        command = [py, "tools/train.py", CONFIG, *train_overrides(run_dir, out, TRAIN_ITERATIONS),
                   f"train.amp={amp}"]
        return Step(name, command, limit, tree, {**env, **(device_env or {})}, partial_ok=partial_ok,
                    note=note, parse=lambda log: training_figures(run_dir))

    bench_json = os.path.join(out, "bench_cuda.json")
    step_json = os.path.join(out, "bench_train_step.json")
    torchrun_dir = os.path.join(out, "torchrun_nccl")
    sanitizer = find_sanitizer()
    no_sanitizer = "" if sanitizer else "compute-sanitizer not found (PATH, CUDA_HOME/bin)"

    def sanitize(tool, k, limit):
        name = f"sanitizer_{tool}"
        junit = os.path.join(out, f"{name}.xml")
        step = pytest_step(name, ["tests/test_cuda.py"], limit, k=k, skip=no_sanitizer,
                           prefix=[sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "1"],
                           parse=lambda log: sanitizer_figures(log, junit))
        # Without torch's caching allocator every tensor is its own allocation, so memcheck sees
        # an access past a tensor's end instead of landing in a pooled neighbour.
        step.env = {**step.env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        return step

    return [
        Step("build", [py, "setup.py", "build_ext", "--inplace", "--build-temp", os.path.join(out, "build")],
             240, tree, build_env, parse=built_for_gpu),
        pytest_step("test_cuda", ["tests/test_cuda.py"], 150),
        Step("bench_cuda", [py, "benchmarks/bench_cuda.py", "--json", bench_json], 120, tree, env,
             parse=lambda log: read_json(bench_json)),
        Step("bench_train_step", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_train_step.py"],
             150, tree, {**env, **TRAIN_STEP_ENV, "PROTOSEG_BENCH_STEP_JSON": step_json}, partial_ok=True,
             note="every config in fp32 first, then bf16 channels-last, then compiled; what finished is reported",
             parse=lambda log: read_json(step_json)),
        train_step("train_gpu_fp32", 60, "none"),
        train_step("train_gpu_bf16", 60, "bf16"),
        train_step("train_cpu_fp32", 45, "none", {"CUDA_VISIBLE_DEVICES": ""}, partial_ok=True,
                   note="CUDA_VISIBLE_DEVICES='', all cores; may stop at its time limit (then no mIoU)"),
        Step("torchrun_nccl", [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                               "tools/train.py", CONFIG, *train_overrides(torchrun_dir, out, 20)],
             60, tree, env, parse=lambda log: torchrun_figures(log, torchrun_dir)),
        sanitize("memcheck", SMALL_TESTS, 75),
        sanitize("racecheck", f"{SMALL_TESTS} and float32", 75),
    ]


def train_overrides(run_dir: str, out: str, iterations: int) -> list[str]:
    """DigitScenes as configured, `iterations` long, one evaluation and checkpoint at the end;
    every run shares the data generated into OUT/data by the first."""
    return [f"output_dir={run_dir}", f"data.root={os.path.join(out, 'data')}",
            f"train.iterations={iterations}", f"train.eval_interval={iterations}",
            f"train.checkpoint_interval={iterations}",
            f"train.log_interval={min(20, iterations // 2)}"]


def copy_tree(out: str) -> str:
    """The sources under test into OUT/tree, without build products."""
    tree = os.path.join(out, "tree")
    os.makedirs(tree, exist_ok=True)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "build", ".pytest_cache")
    for name in TREE:
        src, dst = os.path.join(ROOT, name), os.path.join(tree, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    return tree


def use_prebuilt(tree: str) -> str:
    """After a failed build: the checkout's own library, if it has one, so that the other steps
    still run (on whatever architectures it was built for). Returns what was done."""
    built = glob.glob(os.path.join(ROOT, "protoseg", "_C*.so"))
    if not built:
        return "no library: the steps that import protoseg fail"
    shutil.copy2(built[0], os.path.join(tree, "protoseg"))
    return f"the later steps use the checkout's prebuilt {os.path.relpath(built[0], ROOT)}"


# ---------------------------------------------------------------- machine and report


def machine_info() -> dict:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    props = torch.cuda.get_device_properties(0)
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
        "capability": "{}.{}".format(*torch.cuda.get_device_capability(0)),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available()
        else None,
        "cuda_home": CUDA_HOME, "python": platform.python_version(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git_commit(),
    }


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def overall_status(steps: list[dict], finished: bool) -> str:
    if not finished:
        return "running"
    return "failed" if any(s["status"] in FAILED for s in steps) else "passed"


def write_report(out: str, machine: dict, steps: list[dict], finished: bool = True) -> None:
    """OUT/report.json and OUT/report.md, each written atomically (docs/gpu_check.md)."""
    report = {"status": overall_status(steps, finished), "machine": machine,
              "duration_s": round(sum(s["duration_s"] for s in steps), 1), "steps": steps}
    write_text(os.path.join(out, "report.json"), json.dumps(report, indent=2) + "\n")
    write_text(os.path.join(out, "report.md"), render_markdown(report))


def render_markdown(report: dict) -> str:
    m, steps = report["machine"], report["steps"]
    lines = [f"# protoseg gpu-check: {report['status']}", "",
             f"{m['gpu']} (compute capability {m['capability']}, {m['gpu_memory_gib']} GiB), "
             f"torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, NCCL {m['nccl']}; "
             f"CPU {m['cpu']}, {m['cpu_count']} cores; {m['date']}; commit {m['commit']}.", "",
             "| step | status | seconds | limit | note |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['status']} | {s['duration_s']} | {s['limit_s']} | {s['note']} |"
              for s in steps]
    by_name = {s["name"]: s for s in steps}
    lines += (render_tests(steps) + render_bench(by_name.get("bench_cuda"))
              + render_train_step(by_name.get("bench_train_step")) + render_training(steps))
    lines += ["", "Commands and full output: `report.json` (`steps[].command`) and the `.log` files "
              "beside it."]
    return "\n".join(lines) + "\n"


def render_tests(steps: list[dict]) -> list[str]:
    rows = [s for s in steps if "tests" in s["figures"]]
    if not rows:
        return []
    lines = ["", "## Tests", "", "| step | passed | failed | errors | skipped | sanitizer findings |",
             "| --- | --- | --- | --- | --- | --- |"]
    for s in rows:
        f = s["figures"]
        found = f.get("sanitizer_errors", f.get("hazards", ""))
        lines.append(f"| {s['name']} | {f['passed']} | {f['failures']} | {f['errors']} | {f['skipped']} "
                     f"| {found} |")
    return lines


def render_bench(step: dict | None) -> list[str]:
    if not step or not step["figures"].get("rows"):
        return []
    lines = ["", "## Benchmark (benchmarks/bench_cuda.py)", "",
             f"N = {step['figures']['N']}, D = {step['figures']['D']}; ratio: time over the baseline's.", "",
             "| dtype | K*M | op | ms | baseline | ratio | GB/s | TFLOP/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in step["figures"]["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        lines.append(f"| {r['dtype']} | {r['KM']} | {r['op']} | {r['ms']:.3f} | {r['baseline'] or ''} "
                     f"| {ratio} | {r['GB_per_s']:.0f} | {r['TFLOP_per_s']:.1f} |")
    return lines


def render_train_step(step: dict | None) -> list[str]:
    if not step or not step["figures"].get("records"):
        return []
    records = step["figures"]["records"]
    lines = ["", "## Training step (benchmarks/test_train_step.py)", "",
             f"Batch {records[0]['batch']}, crop {records[0]['crop']}; images/s; ratios of step time, FLOPs "
             "and peak memory.", "",
             "| config | K | setting | ProtoSeg | released | softmax | time ProtoSeg/softmax "
             "| time released/ProtoSeg | FLOPs ProtoSeg/softmax | peak MB ProtoSeg / released / softmax |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        models, ratios = r["models"], r["ratios"]
        speed = {m: f"{models[m]['images_per_s']:.2f}" if m in models else "" for m in ("protoseg", "released", "softmax")}
        peak = " / ".join(f"{models[m]['peak_mb']:.0f}" if m in models else "-"
                          for m in ("protoseg", "released", "softmax"))
        released = ratios["step_s"].get("released/protoseg")
        lines.append(f"| {r['config']} | {r['K']} | {r['setting']} | {speed['protoseg']} | {speed['released']} "
                     f"| {speed['softmax']} | {ratios['step_s']['protoseg/softmax']:.2f}x "
                     f"| {f'{released:.2f}x' if released else ''} "
                     f"| {ratios['gflop_per_image']['protoseg/softmax']:.2f}x | {peak} |")
    return lines


def render_training(steps: list[dict]) -> list[str]:
    rows = [s for s in steps if "iterations_per_s" in s["figures"]]
    if not rows:
        return []
    cpu = next((s["figures"] for s in rows if s["name"] == "train_cpu_fp32"), {})
    lines = ["", f"## Training (DigitScenes, {CONFIG})", "",
             "| run | status | iterations | seconds | it/s | it/s after the first log step | vs CPU "
             "| val mIoU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in rows:
        f = s["figures"]
        speedup = ""
        if cpu.get("steady_iterations_per_s") and f.get("steady_iterations_per_s"):
            speedup = f"{f['steady_iterations_per_s'] / cpu['steady_iterations_per_s']:.1f}x"
        miou = f"{f['mIoU']:.4f}" if f["mIoU"] is not None else "none (not evaluated)"
        lines.append(f"| {s['name']} | {s['status']} | {f['iterations']} | {f['seconds']} "
                     f"| {f['iterations_per_s']} | {f['steady_iterations_per_s']} | {speedup} | {miou} |")
    return lines


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="report folder (created; steps write into it)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all steps together")
    args = parser.parse_args()
    reason = no_gpu_reason()
    if reason:
        print(f"gpu_check: no usable GPU ({reason}); nothing was checked")
        return EXIT_NO_GPU
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):  # its run folders would refuse to start afresh
        print(f"gpu_check: {out} is not empty: name a new or empty folder", file=sys.stderr)
        return 1
    os.makedirs(out, exist_ok=True)
    deadline = time.monotonic() + args.budget
    machine = machine_info()
    tree = copy_tree(out)
    steps: list[dict] = []
    for step in plan(out, machine):
        print(f"gpu_check: {step.name} ...", flush=True)
        result = run_step(step, out, deadline - time.monotonic())
        if step.name == "build" and result["status"] != "passed":
            result["note"] = join_notes(result["note"], use_prebuilt(tree))
        steps.append(result)
        print(f"gpu_check: {step.name} {result['status']} in {result['duration_s']} s", flush=True)
        write_report(out, machine, steps, finished=False)
    write_report(out, machine, steps)
    status = overall_status(steps, True)
    print(f"gpu_check: {status}; report in {out}/report.md")
    return 0 if status == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
