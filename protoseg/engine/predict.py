"""Every prediction goes through here: the trainer's periodic evaluation, tools/test.py,
tools/infer.py and protoseg.Predictor, as the `test:` config section says (TestConfig in
protoseg/config.py).

- whole: the image in one forward pass.
- slide: windows of `crop_size` every `stride`; the last window of a row or column is moved
  back to end at the image's edge, and an image smaller than a window is padded up to it. The
  logits of overlapping windows are averaged. Windows (of every image of the batch) run
  `window_batch` at a time, so memory grows with that, not with the image.
- scales: the image is resized bilinearly by each factor, predicted, and its logits resized
  back to the image's size.
- flip: every scale is also predicted mirrored, its logits mirrored back.

With several views (scales x flips) their softmax probabilities are averaged. With one (the
default: whole, scale 1, no flip) the logits are returned untouched, so the prediction is
exactly the plain forward pass. Every forward pass pads its input at the bottom and right to
a multiple of the network's stride (with zeros after normalisation, i.e. the mean colour) and
crops the logits back, so any image size works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from protoseg.config import TestConfig
from protoseg.engine.anomaly import AnomalyEvaluator, check_scores, score_maps
from protoseg.engine.evaluator import SegEvaluator
from protoseg.engine.outputs import write_panel


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.amp for `device`, with "auto" resolved: bf16 where the device computes it natively
    (CUDA GPUs that support it; CPUs for which oneDNN reports bf16 support), none elsewhere.
    Elsewhere bf16 is emulated and several times slower than float32
    (docs/performance.md#on-a-cpu-without-native-bf16)."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native else "none"


def autocast(device: torch.device, amp: str):
    """The autocast context for train.amp ("none", "bf16", "fp16", "auto")."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"train.amp must be none, bf16, fp16 or auto (got {amp!r})")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def check_test_config(test: TestConfig) -> None:
    """Raise ValueError naming the test.* key that cannot work."""
    if test.mode not in ("whole", "slide"):
        raise ValueError(f"test.mode must be whole or slide (got {test.mode!r})")
    if test.mode == "slide":
        for key in ("crop_size", "stride"):
            value = getattr(test, key)
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"test.mode=slide needs test.{key} as [height, width] of positive "
                                 f"integers (got {value})")
        if any(s > c for s, c in zip(test.stride, test.crop_size)):
            raise ValueError(f"test.stride {test.stride} is larger than test.crop_size {test.crop_size}: "
                             f"pixels between windows would never be predicted")
    if not test.scales or min(test.scales) <= 0:
        raise ValueError(f"test.scales must be a non-empty list of positive factors (got {test.scales})")
    if test.window_batch < 1:
        raise ValueError(f"test.window_batch must be at least 1 (got {test.window_batch})")


def size_divisor(model: nn.Module) -> int:
    """What the network's input size must be a multiple of: its deepest feature stride."""
    reductions = getattr(getattr(model, "backbone", None), "reductions", None)
    return max(reductions) if reductions else 1


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins along one axis of length `size` >= `crop`: every `stride`, the last one
    moved back so that it ends at the edge."""
    count = -(-(size - crop) // stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def num_views(test: TestConfig) -> int:
    return len(test.scales) * (2 if test.flip else 1)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, test: TestConfig, amp: str = "none",
            open_set: Sequence[str] = (), fit: dict | None = None):
    """images [B, 3, H, W] normalised -> [B, K, H, W] float32 scores whose argmax over K is the
    prediction: with one view (num_views(test) == 1) its logits, else the mean over the views
    of their softmax probabilities. `model` (in eval mode) maps images to {"logits": ...}.
    fp16 autocast, which needs CUDA, becomes float32 on other devices.

    open_set: names of open-set scores (protoseg/engine/anomaly.py; `fit` for "vmf"): return
    (scores, [B, S, H, W] float32 open-set maps in that order), each higher for pixels less like
    any known class, averaged over windows and views like the logits."""
    check_test_config(test)
    check_scores(open_set, model)
    if "vmf" in open_set and fit is None:
        raise ValueError("open-set score vmf needs its fit (tools/fit_open_set.py CHECKPOINT, then load_fit)")
    if amp == "fp16" and images.device.type != "cuda":  # a GPU-trained config predicting on the CPU
        amp = "none"
    height, width = images.shape[-2:]
    views = [(s, f) for s in test.scales for f in ((False, True) if test.flip else (False,))]
    divisor = size_divisor(model)
    # The open-set maps travel as more channels after the K logits, so windows, scales and flips
    # treat them exactly as they treat the logits.
    extra = len(open_set)
    total = None
    for scale, flipped in views:
        x = images
        if scale != 1.0:
            size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flipped:
            x = x.flip(-1)
        if test.mode == "whole":
            maps = _forward(model, x, amp, divisor, open_set, fit)
        else:
            maps = _slide(model, x, test, amp, divisor, open_set, fit)
        if flipped:
            maps = maps.flip(-1)
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        if len(views) > 1:
            k = maps.shape[1] - extra
            maps = torch.cat([maps[:, :k].softmax(dim=1), maps[:, k:]], dim=1)
        total = maps if total is None else total.add_(maps)
    if len(views) > 1:
        total = total.div_(len(views))
    if not open_set:
        return total
    return total[:, :-extra], total[:, -extra:]


def pad_to_multiple(x: Tensor, divisor: int, value: float) -> Tensor:
    """x [..., H, W] padded at the bottom and right with `value` to multiples of `divisor`.

    Pads by zero rows rather than testing whether padding is needed: such a test on the size
    becomes a guard that torch.export bakes into an exported program (protoseg/export.py),
    which would then refuse every size on the other side of it."""
    pad_h, pad_w = -x.shape[-2] % divisor, -x.shape[-1] % divisor
    return F.pad(x, (0, pad_w, 0, pad_h), value=value)


def _forward(model: nn.Module, x: Tensor, amp: str, divisor: int, open_set: Sequence[str] = (),
             fit: dict | None = None) -> Tensor:
    """One forward pass, padded to the network's stride and cropped back: float32 logits, then
    the open-set maps of `open_set` as more channels."""
    height, width = x.shape[-2:]
    x = pad_to_multiple(x, divisor, 0.0)
    with autocast(x.device, amp):
        maps = score_maps(model, x, open_set, fit) if open_set else model(x)["logits"]
    return maps[..., :height, :width].float()


def _slide(model: nn.Module, x: Tensor, test: TestConfig, amp: str, divisor: int, open_set: Sequence[str],
           fit: dict | None) -> Tensor:
    (crop_h, crop_w), (stride_h, stride_w) = test.crop_size, test.stride
    batch, _, height, width = x.shape
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    full_h, full_w = x.shape[-2:]
    windows = [(y, x0) for y in window_starts(full_h, crop_h, stride_h)
               for x0 in window_starts(full_w, crop_w, stride_w)]
    # Window-major, image-minor: with one window per image and window_batch >= the batch, the
    # single forward pass sees exactly the whole-image batch (bitwise the same logits).
    items = [(y, x0, b) for y, x0 in windows for b in range(batch)]
    total = None
    for start in range(0, len(items), test.window_batch):
        chunk = items[start:start + test.window_batch]
        crops = torch.stack([x[b, :, y:y + crop_h, x0:x0 + crop_w] for y, x0, b in chunk])
        logits = _forward(model, crops, amp, divisor, open_set, fit)
        if total is None:
            total = logits.new_zeros(batch, logits.shape[1], full_h, full_w)
        for (y, x0, b), window_logits in zip(chunk, logits):
            total[b, :, y:y + crop_h, x0:x0 + crop_w] += window_logits
    count = torch.zeros(full_h, full_w, device=total.device)
    for y, x0 in windows:
        count[y:y + crop_h, x0:x0 + crop_w] += 1
    return (total / count)[..., :height, :width]


def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device, test: TestConfig,
                   amp: str = "none", open_set: Sequence[str] = (),
                   fit: dict | None = None) -> Iterator[tuple[dict, Tensor, Tensor | None]]:
    """(batch, prediction [B, H, W] int64, open-set maps [B, S, H, W] float32 of the scores
    `open_set` or None), on `device`, for each batch of `loader` that has images; `model` is
    put in eval mode for the duration and restored after."""
    for batch in eval_batches(model, loader):
        images = batch["images"].to(device, non_blocking=True)
        result = predict(model, images, test, amp, open_set=open_set, fit=fit)
        scores, score = result if open_set else (result, None)
        yield batch, scores.argmax(dim=1), score


def eval_batches(model: nn.Module, loader: DataLoader) -> Iterator[dict]:
    """The batches of `loader` that have images, `model` in eval mode meanwhile (restored after)."""
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if "images" in batch:
                yield batch
    finally:
        model.train(was_training)


def evaluate_model(model: nn.Module, loader: DataLoader, evaluator: SegEvaluator, device: torch.device,
                   test: TestConfig, amp: str = "none", save_dir: str = "", save_limit: int = 0,
                   anomaly: AnomalyEvaluator | None = None, fit: dict | None = None) -> dict:
    """Predict every batch of `loader` as `test` says, accumulate the confusion matrix (summed
    over ranks) and return the metrics. With `save_dir`, writes up to `save_limit` (0: all)
    panels <name>.png: input | ground truth | prediction, colourised. With `anomaly`, the
    open-set scores anomaly.names are collected there too (its metrics: anomaly.evaluate()).
    `fit`: the von Mises-Fisher fit the "vmf" score needs."""
    evaluator.reset()
    if anomaly is not None:
        anomaly.reset()
    saved = 0
    names = anomaly.names if anomaly is not None else ()
    for batch, pred, score in predict_loader(model, loader, device, test, amp, open_set=names, fit=fit):
        labels = batch["labels"].to(device, non_blocking=True)
        evaluator.process(pred, labels)
        if anomaly is not None:
            anomaly.process(score, labels)
        for i, index in enumerate(batch["indices"].tolist()):
            if not save_dir or (save_limit and saved >= save_limit):
                break
            write_panel(save_dir, loader.dataset.pairs[index][0], labels[i].cpu().numpy(),
                        pred[i].cpu().numpy(), evaluator.class_names, evaluator.ignore_index)
            saved += 1
    return evaluator.evaluate()
