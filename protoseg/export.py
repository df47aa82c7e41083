"""Export a segmentation model for deployment: a torch.export program (.pt2), an AOTInductor
package (.pt2, compiled C++) or an ONNX model, each taking any image size (docs/export.md).

    from protoseg.export import export_model
    export_model(model, "onnx", "model.onnx", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])

The exported program takes what Segmentor.forward takes in eval mode, a normalised float32
image batch [B, 3, H, W], and returns a tuple: the logits [B, K, H, W] at the input's size and,
with open_set, the open-set score [B, 1, H, W]. Inside, it pads the input to the network's
stride and crops the outputs back, as every eager prediction does (protoseg/engine/predict.py),
so any H, W > size_divisor works. protoseg's own operators are replaced by their plain-PyTorch
definitions (protoseg/ops/reference.py), so the deployment side needs torch (pt2, aoti) or an
ONNX runtime, and nothing of protoseg. The preprocessing (mean, std, channel order) travels in
the file's metadata.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import Tensor, nn

from protoseg.config import TestConfig
from protoseg.data.datasets import class_names
from protoseg.data.loader import build_val_loader, prepare_data
from protoseg.engine.checkpoint import atomic_write, load_run
from protoseg.engine.evaluator import SegEvaluator
from protoseg.engine.predict import eval_batches, pad_to_multiple, predict
from protoseg.engine.predict import size_divisor as stride_of
from protoseg.models.segmentor import load_trained_model
from protoseg.ops import reference

FORMATS = ("pt2", "aoti", "onnx")
OUTPUTS = ("logits", "open_set_score")
# The pt2 archive's extra file holding the metadata (torch.export.save's extra_files).
METADATA_FILE = "protoseg.json"

# The inference ops, each replaced by its specification: same arguments, same results.
REFERENCES = {
    torch.ops.protoseg.proto_similarity.default: reference.proto_similarity,
    torch.ops.protoseg.layer_norm_normalize.default: reference.layer_norm_normalize,
}


class Deployable(nn.Module):
    """model's eval forward at any input size: images [B, 3, H, W] (H, W > divisor) padded at
    the bottom and right to multiples of `divisor` (pad_to_multiple, as predict.py's forward
    pass), the model's outputs `names` cropped back to [B, C, H, W], returned as a tuple."""

    def __init__(self, model: nn.Module, divisor: int, names: tuple[str, ...]):
        super().__init__()
        self.model, self.divisor, self.names = model, divisor, names

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        height, width = images.shape[-2:]
        # The deepest feature map must be at least 2 x 2: torch.export specialises a size of 1
        # (guards that would reject every larger image). Stated here, the bound becomes the
        # exported program's declared input range instead.
        torch._check(height > self.divisor, lambda: f"images must be taller than {self.divisor} pixels (got {height})")
        torch._check(width > self.divisor, lambda: f"images must be wider than {self.divisor} pixels (got {width})")
        out = as_dict(self.model(pad_to_multiple(images, self.divisor, 0.0)))
        rows = torch.arange(height, device=images.device)
        cols = torch.arange(width, device=images.device)
        # Cropped by index_select, not slicing: torch.export asks whether a slice is contiguous,
        # i.e. whether padding happened, and bakes the answer into the program as a guard on H, W.
        return tuple(out[name].index_select(2, rows).index_select(3, cols) for name in self.names)


def as_dict(out):
    """A model's output as a dict of outputs: a plain tensor is the logits."""
    return {"logits": out} if isinstance(out, Tensor) else out


def export_program(model: nn.Module, *, open_set: bool = False, size_divisor: int | None = None,
                   batch_size: int = 2) -> torch.export.ExportedProgram:
    """torch.export of `model` (Deployable around it) with dynamic batch, height and width, its
    protoseg ops decomposed into standard aten ops. `model` maps normalised images to their
    logits [B, K, H', W'] at its input's size, or to a dict with "logits" (and "open_set_score"
    [B, 1, H', W'] for open_set), as Segmentor does in eval mode; it is put in eval mode. size_divisor: what its
    input sizes must be multiples of (default: the deepest stride of model.backbone, else 1)."""
    divisor = size_divisor or stride_of(model)
    names = OUTPUTS if open_set else OUTPUTS[:1]
    model.eval()
    device = next(model.parameters()).device
    # An example of neither multiple of the stride nor equal sizes, so that nothing specialises.
    example = torch.randn(batch_size, 3, 2 * divisor + 7, 3 * divisor + 5, device=device)
    with torch.no_grad():
        out = as_dict(model(example))
    missing = [name for name in names if name not in out]
    if missing:
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        hint = " (an open-set score needs a prototype classifier)" if missing == ["open_set_score"] else ""
        raise ValueError(f"the model must return a dict with {list(names)} in eval mode (got {got}){hint}")
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(Deployable(model, divisor, names), (example,),
                                  dynamic_shapes={"images": {0: dim, 2: dim, 3: dim}})
    table = torch.export.default_decompositions()
    table.update(REFERENCES)
    program = program.run_decompositions(table)
    left = sorted({str(n.target) for n in program.graph.nodes if str(n.target).startswith("protoseg.")})
    if left:
        raise ValueError(f"the exported graph still calls {left}: only the inference ops "
                         f"{sorted(str(op) for op in REFERENCES)} have a standard decomposition")
    return program


def save_program(program: torch.export.ExportedProgram, format: str, out: str, metadata: dict) -> None:
    """Write `program` (from export_program) to `out` as `format` with `metadata` (JSON-able
    values): atomically, so `out` is the old file or the whole new one. pt2: torch.export.save
    with the metadata as the extra file protoseg.json; aoti: an AOTInductor package for the
    program's device, metadata values JSON-encoded in its metadata; onnx: opset of the torch
    exporter, metadata values JSON-encoded in metadata_props."""
    check_format(format)
    check_writable(out)
    names = list(OUTPUTS[:len(program.graph_signature.user_outputs)])
    encoded = {key: json.dumps(value) for key, value in metadata.items()}
    if format == "pt2":
        atomic_write(out, lambda f: torch.export.save(program, f, extra_files={METADATA_FILE: json.dumps(metadata)}))
    elif format == "aoti":
        atomic_write(out, lambda f: torch._inductor.aoti_compile_and_package(
            program, package_path=f, inductor_configs={"aot_inductor.metadata": encoded}))
    else:
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, input_names=["images"],
                                         output_names=names)
        onnx_program.model.metadata_props.update(encoded)
        atomic_write(out, lambda f: f.write(onnx_program.model_proto.SerializeToString()))


def export_model(model: nn.Module, format: str, out: str, *, mean, std, channel_order: str = "rgb",
                 open_set: bool = False, size_divisor: int | None = None, metadata: dict | None = None) -> None:
    """Export `model` for deployment to `out` in `format` ("pt2", "aoti" or "onnx").

    model: maps normalised float32 images [B, 3, H, W] to their logits [B, K, H, W] at the
    input's size, or to a dict with "logits" and, for open_set, "open_set_score" [B, 1, H, W]
    (protoseg's Segmentor; a host model whose classifier is protoseg's PrototypeHead, wrapped to
    return its upsampled logits, docs/export.md); exported on the
    device of its parameters (an aoti package runs on that kind of device only). mean, std:
    per channel in the network's channel order, on the 0-255 scale; channel_order: "rgb" or
    "bgr". size_divisor: what the network's input sizes must be multiples of (default: the
    deepest stride of model.backbone, else 1). metadata: more entries for the file's metadata.

    The exported program returns (logits,) or (logits, open_set_score) at the input's size for
    any B and any H, W > size_divisor; the file's metadata holds mean, std,
    channel_order, outputs, size_divisor and `metadata`. Raises ValueError for a bad format, a
    model without the outputs asked for, or an output path that cannot be written."""
    check_format(format)  # before the slow export, as save_program will
    check_writable(out)
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be rgb or bgr (got {channel_order!r})")
    divisor = size_divisor or stride_of(model)
    program = export_program(model, open_set=open_set, size_divisor=divisor)
    info = {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "channel_order": channel_order,
            "outputs": list(OUTPUTS if open_set else OUTPUTS[:1]), "size_divisor": divisor, **(metadata or {})}
    save_program(program, format, out, info)


def export_checkpoint(checkpoint: str, format: str, out: str, *, open_set: bool = False,
                      device: str = "cpu", overrides=()) -> None:
    """export_model for a protoseg checkpoint, with the preprocessing of the config it holds
    (with `overrides`); the metadata also names the classes. Raises ValueError for an unreadable checkpoint or bad arguments (open_set on a softmax classifier)."""
    check_format(format)  # before loading anything
    check_writable(out)
    state, cfg = load_run(checkpoint, "", overrides)  # ValueError: one line naming the file
    if open_set and cfg.model.classifier != "prototype":
        raise ValueError(f"--open-set needs a prototype classifier: {checkpoint} holds a "
                         f"model.classifier={cfg.model.classifier} model (no open-set score output)")
    d = cfg.data
    model = load_trained_model(cfg, state).to(device)
    names = class_names(d.dataset, d.num_classes, d.unknown_digits)
    export_model(model, format, out, mean=d.mean, std=d.std, channel_order=d.channel_order, open_set=open_set,
                 metadata={"class_names": names, "checkpoint": os.path.basename(checkpoint),
                           "iteration": state.get("iteration")})


def load_exported(path: str, format: str):
    """The exported file `path` run by its own runtime, as the deployment side runs it: a
    function images [B, 3, H, W] float32 -> tuple of output tensors (on the images' device).
    pt2: torch.export.load; aoti: torch._inductor.aoti_load_package; onnx: onnxruntime (CPU)."""
    check_format(format)
    if format == "pt2":
        module = torch.export.load(path).module()
        return lambda images: tuple(module(images))
    if format == "aoti":
        runner = torch._inductor.aoti_load_package(path)
        return lambda images: tuple(runner(images))
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images: tuple(torch.from_numpy(o).to(images.device)
                                for o in session.run(None, {"images": images.cpu().numpy()}))


@torch.no_grad()
def verify_checkpoint(checkpoint: str, path: str, format: str, *, open_set: bool = False,
                      overrides=(), device: str = "cpu") -> dict:
    """Run the export `path` of `checkpoint` (load_exported) and the eager model beside it on
    the config's val split (or data.val_images/val_labels in `overrides`): the eager side is
    protoseg/engine/predict.py's whole-image pass in float32, what the export holds. Returns
    {"images", "sizes" (the [H, W]s seen), "max_abs_diff" (logits), "argmax_agreement"
    (fraction of pixels), "miou_exported", "miou_eager"}, with open_set also
    "score_max_abs_diff"."""
    state, cfg = load_run(checkpoint, "", overrides)  # ValueError: one line naming the file
    d = cfg.data
    if not d.val_images:
        prepare_data(cfg)
    model = load_trained_model(cfg, state).to(device)
    run = load_exported(path, format)
    eager_module = Deployable(model, stride_of(model), OUTPUTS)
    names = class_names(d.dataset, d.num_classes, d.unknown_digits)
    evaluators = [SegEvaluator(d.num_classes, names, d.ignore_index, d.unknown_index) for _ in range(2)]
    result = {"images": 0, "sizes": [], "max_abs_diff": 0.0, "argmax_agreement": 0, "score_max_abs_diff": 0.0}
    pixels = 0
    for batch in eval_batches(model, build_val_loader(cfg, 0, 1)):
        images, labels = batch["images"].to(device), batch["labels"].to(device)
        # The logits of tools/test.py's path; the score of the model's own output, un-exported.
        eager_logits = predict(model, images, TestConfig())
        outputs = run(images)
        result["max_abs_diff"] = max(result["max_abs_diff"], (outputs[0] - eager_logits).abs().max().item())
        if open_set:
            diff = (outputs[1] - eager_module(images)[1]).abs().max().item()
            result["score_max_abs_diff"] = max(result["score_max_abs_diff"], diff)
        pred, eager_pred = outputs[0].argmax(dim=1), eager_logits.argmax(dim=1)
        result["argmax_agreement"] += (pred == eager_pred).sum().item()
        pixels += pred.numel()
        evaluators[0].process(pred, labels)
        evaluators[1].process(eager_pred, labels)
        result["images"] += len(images)
        if list(images.shape[-2:]) not in result["sizes"]:
            result["sizes"].append(list(images.shape[-2:]))
    if not open_set:
        del result["score_max_abs_diff"]
    result["argmax_agreement"] /= max(pixels, 1)
    result["miou_exported"], result["miou_eager"] = (e.evaluate()["mIoU"] for e in evaluators)
    return result


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} (got {format!r})")


def check_writable(out: str) -> None:
    """Raise ValueError unless a file `out` can be created or replaced, found by creating (and
    removing) a file beside it: before any slow work, and true for root and read-only mounts too."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise ValueError(f"cannot write {out}: it is a folder")
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {out}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(out)}.probe"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from e
