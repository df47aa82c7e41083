"""Where one DataLoader worker's time per training sample goes, before and after the transform's
fixes (docs/performance.md's data pipeline table): the samples of benchmarks/test_data_pipeline.py
read through the real data set under cProfile, `before` and `current` alternating pass by pass (a
pass: the 16 samples) so that load from other processes falls on both alike; OpenCV serial, as in
a worker. Not sample by sample: there each sample ran in the memory the other had just freed,
and the same decode measured 7% slower in `current` than in `before`.

    python benchmarks/profile_data_pipeline.py [passes]   # passes over the 16 samples (default 3)

Stages are cProfile's cumulative time of the functions that do them, per sample: the image's
decode is read_image (imread and BGR to RGB); the label's is the rest of SegmentationDataset.load
(imread, value checks); `rest` is the rest of the sample's time (the per-sample RNG, Python).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).parent))
from conftest import machine  # noqa: E402
from test_data_pipeline import DATASETS, ITEMS, before_pipeline, make_pipeline  # noqa: E402

# stage: (its function in before, in current, the stage whose time that function's includes)
STAGES = {
    "decode image": ("read_image", "read_image", None),
    "decode label, checks": ("load", "load", "decode image"),
    "scale and crop": ("_scale_crop_before", "random_scale_crop", None),
    "flip": (None, "flip", None),  # before: [:, ::-1] views, no work until the later passes
    "photometric": ("_photometric_before", "photometric_distortion", None),
    "normalise": ("_normalize_before", "normalize_image", None),
    "label to int64": ("_to_tensors_before", "to_tensors", "normalise"),
}


def _cumulative(profile: cProfile.Profile) -> dict[str, float]:
    """Function name -> cumulative seconds (a built-in's last word: "flip" for cv2.flip, which
    cProfile calls "<flip>")."""
    out: dict[str, float] = {}
    for (_, _, name), (_, _, _, cumulative, _) in pstats.Stats(profile).stats.items():
        key = name.strip("<>").split(".")[-1].split(" ")[-1]
        out[key] = out.get(key, 0.0) + cumulative
    return out


def main(passes: int) -> None:
    cv2.setNumThreads(0)  # serial, as _worker_init sets it in a DataLoader worker
    print(machine(), "; OpenCV threads:", cv2.getNumThreads(), flush=True)
    for dataset in DATASETS:
        current, crops, workers, files = make_pipeline(dataset, tempfile.mkdtemp(prefix=f"{dataset}_"))
        impls = {"before": before_pipeline(current), "current": current}
        profiles = {name: cProfile.Profile() for name in impls}
        for data in impls.values():  # warm-up
            data[ITEMS[0]]
        for _ in range(passes):
            for name, data in impls.items():
                profiles[name].enable()
                for item in ITEMS:
                    data[item]
                profiles[name].disable()
        n = passes * len(ITEMS)
        print(f"\n{files}; {n} samples each, ms per sample")
        print(f"  {'stage':<22} {'before':>8} {'current':>8}")
        rows = {stage: [] for stage in [*STAGES, "rest", "sample"]}
        for i, name in enumerate(impls):
            cumulative = _cumulative(profiles[name])
            raw = {stage: cumulative.get(functions[i], 0.0) for stage, functions in STAGES.items()}
            for stage, (*_, within) in STAGES.items():
                rows[stage].append(raw[stage] - (raw[within] if within else 0.0))
            rows["sample"].append(cumulative["__getitem__"])
            rows["rest"].append(rows["sample"][-1] - sum(rows[stage][-1] for stage in STAGES))
        for stage, seconds in rows.items():
            print(f"  {stage:<22} {seconds[0] / n * 1e3:8.2f} {seconds[1] / n * 1e3:8.2f}")
        rates = [n / seconds for seconds in rows["sample"]]
        print(f"  images/s per worker   {rates[0]:8.1f} {rates[1]:8.1f}   "
              f"current / before: {rates[1] / rates[0]:.2f}x")
        print(f"  one GPU step of {crops} crops is fed by 1 worker if >= {crops / rates[1] * 1e3:.0f} ms, "
              f"by the config's {workers} if >= {crops / rates[1] / workers * 1e3:.0f} ms (current)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
