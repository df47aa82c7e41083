"""tools/gpu_check.py without a GPU: the one-line exit, and the step runner, parsers and report
writer on synthetic steps (the GPU steps themselves only run where there is a GPU)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tool_command

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
spec.loader.exec_module(gpu_check)

MACHINE = {"gpu": "NVIDIA H200", "gpu_count": 1, "capability": "9.0", "gpu_memory_gib": 139.8,
           "torch": "2.11.0+cu128", "cuda": "12.8", "cudnn": 91000, "nccl": "2.27.3",
           "cuda_home": "/usr/local/cuda", "python": "3.12.3", "cpu": "Some CPU", "cpu_count": 16,
           "host": "h", "date": "2026-12-02 16:00:00 UTC", "commit": None}


def test_without_a_gpu_one_line_and_status_2(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(tool_command("gpu_check.py", str(out)), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # the timeout: a hang
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no usable GPU"), lines
    assert not out.exists(), "nothing is done before the GPU check"


def _step(name, code, limit=60, **kwargs):
    return gpu_check.Step(name, [sys.executable, "-c", code], limit, **kwargs)


def test_run_step_records_pass_failure_timeout_and_budget(tmp_path):
    out = str(tmp_path)
    count_lines = lambda log: {"lines": len(open(log).readlines())}  # noqa: E731
    ok = gpu_check.run_step(_step("ok", "print('hello')", parse=count_lines), out, 100)
    assert ok["status"] == "passed" and ok["returncode"] == 0
    assert ok["figures"] == {"lines": 2}  # the command line, then the output
    assert "hello" in (tmp_path / "ok.log").read_text()

    bad = gpu_check.run_step(_step("bad", "import sys; print('boom'); sys.exit(3)", parse=count_lines),
                             out, 100)
    assert (bad["status"], bad["returncode"]) == ("failed", 3)
    assert bad["figures"] == {"lines": 2}, "a failed step's figures are read too (which tests failed)"
    missing = gpu_check.run_step(gpu_check.Step("missing", [str(tmp_path / "no-such-tool")], 60), out, 100)
    assert missing["status"] == "failed" and "could not start" in missing["note"]

    def refuse(log):
        raise gpu_check.CheckFailed("ran, but not on the GPU")

    checked = gpu_check.run_step(_step("checked", "pass", parse=refuse), out, 100)
    assert checked["status"] == "failed" and "not on the GPU" in checked["note"]

    finished = tmp_path / "finished"  # written only by a step that was not stopped at its limit
    slow = gpu_check.run_step(_step("slow", f"import pathlib, time; time.sleep(60); pathlib.Path({str(finished)!r})"
                                            f".touch()", limit=1), out, 100)
    assert slow["status"] == "timeout" and slow["returncode"] is None and not finished.exists()
    partial = gpu_check.run_step(_step("partial", "import time; time.sleep(60)", limit=1, partial_ok=True,
                                       parse=lambda log: {"iterations": 7}), out, 100)
    assert partial["status"] == "stopped" and partial["figures"] == {"iterations": 7}

    late = gpu_check.run_step(_step("late", "pass"), out, gpu_check.MIN_STEP - 1)
    assert late["status"] == "skipped" and "time budget" in late["note"] and late["log"] is None
    assert not (tmp_path / "late.log").exists()
    unwanted = gpu_check.run_step(_step("unwanted", "pass", skip="no tool"), out, 100)
    assert (unwanted["status"], unwanted["note"]) == ("skipped", "no tool")


def test_training_figures_from_a_run_folder(tmp_path):
    records = [{"iter": 20, "loss": 1.0, "time": 2.0}, {"iter": 200, "loss": 0.5, "time": 11.0},
               {"iter": 200, "eval": {"mIoU": 0.5}},
               {"iter": 200, "checkpoint": "x", "replicas_identical": 1}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = gpu_check.training_figures(str(tmp_path))
    # 200 / 11 s over the whole loop; (200 - 20) / (11 - 2) s after the first logged step
    assert figures == {"iterations": 200, "seconds": 11.0, "iterations_per_s": 18.182,
                       "steady_iterations_per_s": 20.0, "mIoU": None}
    (tmp_path / "eval_results.json").write_text(json.dumps({"mIoU": 0.625, "mAcc": 0.7}))
    assert gpu_check.training_figures(str(tmp_path))["mIoU"] == 0.625


def test_test_counts_from_pytests_junit_file(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "def test_c(): assert False\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_d(): pass\n")
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True, timeout=120)
    assert gpu_check.junit_figures(str(junit)) == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1,
                                                   "passed": 2}
    junit.write_text('<testsuites><testsuite tests="3" failures="0" errors="0" skipped="3"/></testsuites>')
    with pytest.raises(gpu_check.CheckFailed, match="no test ran"):
        gpu_check.junit_figures(str(junit))


def test_sanitizer_summaries(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="3" failures="0" errors="0" skipped="1"/></testsuites>')
    log = tmp_path / "memcheck.log"
    log.write_text("3 passed\n========= ERROR SUMMARY: 2 errors\n")
    assert gpu_check.sanitizer_figures(str(log), str(junit)) == {
        "sanitizer_errors": 2, "tests": 3, "failures": 0, "errors": 0, "skipped": 1, "passed": 2}
    log.write_text("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert gpu_check.sanitizer_figures(str(log), str(junit))["hazards"] == 0
    log.write_text("Segmentation fault\n")
    with pytest.raises(gpu_check.CheckFailed, match="no compute-sanitizer summary"):
        gpu_check.sanitizer_figures(str(log), str(junit))


def _result(name, status, figures=None, note=""):
    return {"name": name, "status": status, "command": f"run {name}", "limit_s": 60, "duration_s": 12.5,
            "returncode": {"passed": 0, "failed": 1}.get(status), "log": f"{name}.log",
            "figures": figures or {}, "note": note}


def test_report_json_and_markdown_name_the_failed_step(tmp_path):
    bench = {"device": "NVIDIA H200", "N": 1048576, "D": 720, "rows": [
        {"dtype": "float32", "K": 19, "M": 10, "KM": 190, "op": "gemm1", "baseline": None, "bytes": 4e9,
         "ms": 2.0, "flops": 2.9e11, "ratio": None, "GB_per_s": 2000.0, "TFLOP_per_s": 145.0},
        {"dtype": "float32", "K": 19, "M": 10, "KM": 190, "op": "similarity", "baseline": "gemm1",
         "bytes": 3.2e9, "ms": 2.5, "flops": 2.9e11, "ratio": 1.25, "GB_per_s": 1280.0,
         "TFLOP_per_s": 116.0}]}
    train = {"iterations": 200, "seconds": 5.0, "iterations_per_s": 40.0, "steady_iterations_per_s": 50.0,
             "mIoU": 0.41234}
    cpu = {"iterations": 120, "seconds": 60.0, "iterations_per_s": 2.0, "steady_iterations_per_s": 2.5,
           "mIoU": None}
    figures = lambda img_s, mb: {"step_s": 2 / img_s, "images_per_s": img_s, "gflop_per_image": 1.0,  # noqa: E731
                                 "peak_mb": mb}
    train_step = {"machine": "x", "records": [
        {"config": "ade20k_full_hrnet48", "K": 847, "setting": "fp32", "batch": 2, "crop": 512, "device": "cuda",
         "models": {"protoseg": figures(20.0, 1300), "released": figures(8.0, 2000), "softmax": figures(30.0, 1000)},
         "ratios": {"step_s": {"protoseg/softmax": 1.5, "released/protoseg": 2.5},
                    "gflop_per_image": {"protoseg/softmax": 1.63, "released/protoseg": 1.2},
                    "peak_mb": {"protoseg/softmax": 1.3, "released/protoseg": 1.54}}},
        {"config": "ade20k_full_hrnet48", "K": 847, "setting": "compiled-bf16-cl", "batch": 2, "crop": 512,
         "device": "cuda", "models": {"protoseg": figures(40.0, 700), "softmax": figures(50.0, 600)},
         "ratios": {"step_s": {"protoseg/softmax": 1.25}, "gflop_per_image": {"protoseg/softmax": 1.63},
                    "peak_mb": {"protoseg/softmax": 1.17}}}]}
    steps = [_result("build", "passed", {"architecture": "9.0"}),
             _result("test_cuda", "failed",
                     {"tests": 10, "failures": 2, "errors": 0, "skipped": 1, "passed": 7}),
             _result("bench_cuda", "passed", bench),
             _result("bench_train_step", "stopped", train_step, note="stopped at its time limit of 60 s"),
             _result("train_gpu_fp32", "passed", train),
             _result("train_cpu_fp32", "stopped", cpu, note="stopped at its time limit of 60 s"),
             _result("sanitizer_racecheck", "skipped", note="compute-sanitizer not found")]
    gpu_check.write_report(str(tmp_path), MACHINE, steps)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed"
    assert report["machine"] == MACHINE and report["steps"] == steps
    assert report["duration_s"] == 87.5
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# protoseg gpu-check: failed\n")
    assert "NVIDIA H200 (compute capability 9.0" in md and "torch 2.11.0+cu128, CUDA 12.8" in md
    assert "| test_cuda | failed | 12.5 | 60 |" in md
    assert "| test_cuda | 7 | 2 | 0 | 1 |" in md
    assert "| float32 | 190 | similarity | 2.500 | gemm1 | 1.25x | 1280 | 116.0 |" in md
    assert "| ade20k_full_hrnet48 | 847 | fp32 | 20.00 | 8.00 | 30.00 | 1.50x | 2.50x | 1.63x | 1300 / 2000 / 1000 |" in md
    assert "| ade20k_full_hrnet48 | 847 | compiled-bf16-cl | 40.00 |  | 50.00 | 1.25x |  | 1.63x | 700 / - / 600 |" in md
    # 50 it/s against the CPU's 2.5 after the first logged step
    assert "| train_gpu_fp32 | passed | 200 | 5.0 | 40.0 | 50.0 | 20.0x | 0.4123 |" in md
    assert "| train_cpu_fp32 | stopped | 120 | 60.0 | 2.0 | 2.5 | 1.0x | none (not evaluated) |" in md
    assert "| sanitizer_racecheck | skipped | 12.5 | 60 | compute-sanitizer not found |" in md
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]  # no temporary file left

    # skipped and stopped steps are not failures; an unfinished report says so
    steps[1] = _result("test_cuda", "passed")
    gpu_check.write_report(str(tmp_path), MACHINE, steps)
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "passed"
    gpu_check.write_report(str(tmp_path), MACHINE, steps, finished=False)
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "running"


def test_torchrun_needs_the_nccl_backend(tmp_path):
    records = [{"iter": 10, "loss": 1.0, "time": 1.0}, {"iter": 20, "loss": 0.9, "time": 1.5},
               {"iter": 20, "checkpoint": "x", "replicas_identical": 1}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    log = tmp_path / "torchrun.log"
    # the trainer's start line (protoseg/engine/trainer.py, start_loop)
    log.write_text("digitscenes_protoseg: 1.78M parameters, 1 rank(s) on cuda:0 (nccl), iterations 0 -> 20\n")
    figures = gpu_check.torchrun_figures(str(log), str(tmp_path))
    assert (figures["backend"], figures["device"], figures["replicas_identical"]) == ("nccl", "cuda:0", 1)
    assert figures["steady_iterations_per_s"] == 20.0  # 10 iterations in 0.5 s
    log.write_text("digitscenes_protoseg: 1.78M parameters, 1 rank(s) on cpu (gloo), iterations 0 -> 20\n")
    with pytest.raises(gpu_check.CheckFailed, match="backend gloo"):
        gpu_check.torchrun_figures(str(log), str(tmp_path))
