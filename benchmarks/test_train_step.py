"""One whole training step of each paper config family, as the trainer runs it (its forward and
loss, backward, its optimizer step): ProtoSeg (our ops), the released algorithm
(`model.prototype_impl=reference`) and the softmax twin (configs/*_softmax.yaml), all in this
process, on random weights (`model.pretrained=false`).

Configs: HRNet-W48 at K = 19, 150 and 847 (cityscapes_hrnet48, ade20k_hrnet48,
ade20k_full_hrnet48) and SegFormer MiT-B5 (cityscapes_mitb5_segformer); any other pair of
configs/<name>_protoseg.yaml and <name>_softmax.yaml on request (`digitscenes`: `make demo`'s).
Settings, each a set of trainer options joined by "-": `fp32` (eager, float32, NCHW) and
`bf16-cl` (train.amp=bf16, train.channels_last), and on request `compiled` (train.compile) and
`loop` (train.optimizer_impl=loop, where the fused optimizer is the default).

Before timing, ProtoSeg's and the released algorithm's losses on the same batch, from the same
weights, must agree. Besides the times (summary: each model's ratio to softmax, and released
/ ProtoSeg), the summary has per model: images/s, the FLOPs of a step per image
(torch.utils.flop_counter, our ops' GEMMs included through their registered formulas) and the
step's peak memory above what the process held before it (after one warm-up step: the
optimizer state exists), each as ratios like the times. CPU peak memory: the resident set's
high-water mark, one child process per model (as benchmarks/test_memory.py); CUDA:
torch.cuda.max_memory_allocated.

Sizes: PROTOSEG_BENCH_STEP="batch,crop" (default "2,256"); PROTOSEG_BENCH_STEP_CONFIGS and
PROTOSEG_BENCH_STEP_SETTINGS (comma-separated, default all four configs and "fp32,bf16-cl");
PROTOSEG_BENCH_STEP_DEVICE (default cuda when there is one, else cpu); PROTOSEG_BENCH_STEP_OVERRIDES,
config overrides separated by spaces for every model (`make test`: a small HRNet);
PROTOSEG_BENCH_STEP_JSON, a file the figures are also written to (tools/gpu_check.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROUNDS, machine, note, run
from torch.utils.flop_counter import FlopCounterMode

from protoseg.config import load_config
from protoseg.engine.checkpoint import atomic_write
from protoseg.engine.trainer import build_forward, build_optimizer
from protoseg.models.segmentor import build_model

ROOT = Path(__file__).resolve().parent.parent
BATCH, CROP = (int(v) for v in os.environ.get("PROTOSEG_BENCH_STEP", "2,256").split(","))
CONFIGS = os.environ.get("PROTOSEG_BENCH_STEP_CONFIGS",
                         "cityscapes_hrnet48,ade20k_hrnet48,ade20k_full_hrnet48,cityscapes_mitb5_segformer").split(",")
SETTINGS = os.environ.get("PROTOSEG_BENCH_STEP_SETTINGS", "fp32,bf16-cl").split(",")
DEVICE = os.environ.get("PROTOSEG_BENCH_STEP_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
OVERRIDES = os.environ.get("PROTOSEG_BENCH_STEP_OVERRIDES", "").split()
# our names in the summary: "fused" is ProtoSeg, "reference" the released algorithm
MODELS = {"fused": ("protoseg", []), "reference": ("protoseg", ["model.prototype_impl=reference"]),
          "softmax": ("softmax", [])}
OPTIONS = {"fp32": ["train.amp=none"], "bf16": ["train.amp=bf16"], "cl": ["train.channels_last=true"],
           "compiled": ["train.compile=true"], "loop": ["train.optimizer_impl=loop"]}


def step_config(config: str, model: str, setting: str):
    """The config of one (paper config, model, setting): its YAML, at the benchmark's crop."""
    suffix, overrides = MODELS[model]
    options = [o for part in setting.split("-") for o in OPTIONS[part]]
    return load_config(str(ROOT / "configs" / f"{config}_{suffix}.yaml"),
                       ["model.pretrained=false", "model.backbone_checkpoint=''",
                        f"data.crop_size=[{CROP},{CROP}]", *overrides, *options, *OVERRIDES])


class Step:
    """The trainer's step for one config: model (seeded), optimizer, forward and loss; a batch."""

    def __init__(self, config: str, model: str, setting: str):
        self.cfg = cfg = step_config(config, model, setting)
        device = torch.device(DEVICE)
        torch.manual_seed(0)
        self.model = build_model(cfg).to(device).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.forward = build_forward(self.model, cfg, device)
        g = torch.Generator().manual_seed(1)
        self.images = torch.randn(BATCH, 3, CROP, CROP, generator=g).to(device)
        self.labels = torch.randint(0, cfg.data.num_classes, (BATCH, CROP, CROP), generator=g).to(device)

    def __call__(self) -> torch.Tensor:
        loss, terms = self.forward(self.images, self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return terms

    def flops_per_image(self) -> float:
        with FlopCounterMode(display=False) as counter:
            self()
        return counter.get_total_flops() / BATCH


# The child process of a CPU memory figure: one model's warm-up step, the high-water mark reset
# (/proc/self/clear_refs), the measured step.
CHILD = """
import json, sys
sys.path.insert(0, {bench_dir!r})
from test_train_step import Step

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

step = Step({config!r}, {model!r}, {setting!r})
step()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kb("VmRSS")
step()
print(json.dumps({{"peak_mb": (status_kb("VmHWM") - before) / 1024}}))
"""


def peak_mb(step: Step, config: str, model: str, setting: str) -> float:
    if DEVICE == "cuda":
        step()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not os.path.exists("/proc/self/clear_refs") or CROP < 128:  # toy sizes (make test): no memory figure
        return float("nan")
    code = CHILD.format(bench_dir=str(Path(__file__).parent), config=config, model=model, setting=setting)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory child of {config} {model} {setting} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


_FIGURES: dict[tuple[str, str], dict[str, dict]] = {}
_RECORDS: list[dict] = []


def _agree(config: str, setting: str) -> None:
    """ProtoSeg's and the released algorithm's loss terms on one batch from the same weights (the
    released algorithm in eager mode when ProtoSeg is compiled)."""
    fused, reference = Step(config, "fused", setting), Step(config, "reference", _eager(setting))
    reference.model.load_state_dict(fused.model.state_dict())
    torch.manual_seed(2)  # the same dropout masks
    a = fused.forward(fused.images, fused.labels)[1]
    torch.manual_seed(2)
    b = reference.forward(reference.images, reference.labels)[1]
    tol = {"rtol": 2e-2, "atol": 2e-3} if "bf16" in setting else {"rtol": 1e-4, "atol": 1e-5}
    for key in ("seg", "ppc", "ppd"):
        torch.testing.assert_close(a[key].float(), b[key].float(), **tol,
                                   msg=lambda m, k=key: f"{config} {setting} {k}: {m}")


# settings outermost, so that a run cut short (tools/gpu_check.py) has every config's first setting
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_train_step(benchmark, setting, config, model):
    if model not in _models(setting):
        pytest.skip("the released algorithm does not compile as one graph: it selects each class's pixels, "
                    "a shape known only at run time")
    if model == "fused":
        _agree(config, setting)
    step = Step(config, model, setting)
    assert all(torch.isfinite(v) for v in step().values())
    group = f"train step {config} {setting}"
    run(benchmark, group, model, step, baseline="softmax", rounds=ROUNDS)
    figures = _FIGURES.setdefault((config, setting), {})
    figures[model] = {"step_s": benchmark.stats.stats.mean, "images_per_s": BATCH / benchmark.stats.stats.mean,
                      "gflop_per_image": _counted(step, config, model, setting).flops_per_image() / 1e9,
                      "peak_mb": peak_mb(step, config, model, setting)}
    if len(figures) == len(_models(setting)):
        _summarise(config, setting, figures)


def _eager(setting: str) -> str:
    return "-".join(part for part in setting.split("-") if part != "compiled")


def _counted(step: Step, config: str, model: str, setting: str) -> Step:
    """The step whose FLOPs are counted: the same in eager mode when compiled (the counter is a
    dispatch mode, which dynamo does not trace through; compiling changes no FLOP)."""
    return Step(config, model, _eager(setting)) if "compiled" in setting else step


def _models(setting: str) -> list[str]:
    return [m for m in MODELS if not ("compiled" in setting and m == "reference")]


def _summarise(config: str, setting: str, f: dict) -> None:
    """One summary line and one record (PROTOSEG_BENCH_STEP_JSON) per (config, setting)."""
    k = step_config(config, "softmax", setting).data.num_classes
    ratios = {}
    for key in ("step_s", "gflop_per_image", "peak_mb"):
        ratios[key] = {"protoseg/softmax": f["fused"][key] / f["softmax"][key]}
        if "reference" in f:
            ratios[key]["released/protoseg"] = f["reference"][key] / f["fused"][key]
    if "reference" in f:
        over = {m: f[m]["peak_mb"] - f["softmax"]["peak_mb"] for m in ("fused", "reference")}
        ratios["peak_mb_over_softmax"] = {"protoseg/released": over["fused"] / over["reference"]
                                          if over["reference"] > 0 else float("nan")}
    names = {"fused": "protoseg", "reference": "released", "softmax": "softmax"}
    record = {"config": config, "K": k, "setting": setting, "batch": BATCH, "crop": CROP, "device": DEVICE,
              "models": {names[m]: v for m, v in f.items()}, "ratios": ratios}
    _RECORDS.append(record)
    line = f"train step {config} K={k} {setting} batch {BATCH} crop {CROP} on {DEVICE}: "
    line += ", ".join(f"{m} {v['images_per_s']:.2f} img/s {v['gflop_per_image']:.0f} GFLOP/img {v['peak_mb']:.0f} MB"
                      for m, v in record["models"].items())
    for key, what in (("step_s", "time"), ("gflop_per_image", "FLOPs"), ("peak_mb", "peak memory")):
        line += "; " + what + " " + ", ".join(f"{name} {r:.2f}x" for name, r in ratios[key].items())
    if "peak_mb_over_softmax" in ratios:
        line += f"; memory over softmax, protoseg/released {ratios['peak_mb_over_softmax']['protoseg/released']:.2f}"
    note(line)
    path = os.environ.get("PROTOSEG_BENCH_STEP_JSON")
    if path:
        text = json.dumps({"machine": machine(), "records": _RECORDS}, indent=1).encode()
        atomic_write(path, lambda out: out.write(text))
