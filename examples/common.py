"""What the three examples share and a user already has: DigitScenes loaders (protoseg's own
synthetic data set, generated on first use), the command line, and val mIoU through protoseg's
SegEvaluator. The ProtoSeg lines are in each example's training loop."""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from protoseg.config import load_config
from protoseg.data.datasets import class_names
from protoseg.data.loader import build_train_loader, build_val_loader, prepare_data
from protoseg.engine.evaluator import SegEvaluator

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "digitscenes_protoseg.yaml")


def parse_args(argv, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--softmax", action="store_true", help="train the host's own softmax classifier instead")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--data", default="data/digitscenes", help="DigitScenes folder (generated if absent)")
    p.add_argument("--scenes", type=int, default=2000, help="training scenes to generate")
    p.add_argument("--val-scenes", type=int, default=300)
    return p.parse_args(argv)


def start(argv, doc: str):
    """(arguments, config, endless (images, labels) training batches, val loader) of DigitScenes
    at 64x64, 11 classes, with the seed set and the clock started (see report)."""
    args = parse_args(argv, doc.splitlines()[0])
    args.started = time.time()
    torch.manual_seed(0)
    overrides = [f"data.root={args.data}", f"data.scenes_train={args.scenes}", f"data.scenes_val={args.val_scenes}",
                 f"train.batch_size={min(args.batch_size, args.scenes)}", f"train.iterations={args.iterations}",
                 "data.eval_batch_size=16"]
    cfg = load_config(CONFIG, overrides)
    prepare_data(cfg)
    batches = ((b["images"], b["labels"]) for b in build_train_loader(cfg, 0, 1, 0))
    return args, cfg, batches, build_val_loader(cfg, 0, 1)


def optimizer_step(model, args):
    """update(loss): backward and a step of AdamW with a poly schedule, as
    configs/digitscenes_protoseg.yaml trains."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, args.iterations) / args.iterations) ** 0.9)

    def update(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    return update


@torch.no_grad()
def val_miou(cfg, val_loader, logits_of) -> float:
    """mIoU over the val scenes; logits_of(images) -> [B, K, h, w] at any resolution h, w."""
    d = cfg.data
    evaluator = SegEvaluator(d.num_classes, class_names(d.dataset, d.num_classes), d.ignore_index)
    for batch in val_loader:
        labels = batch["labels"]
        logits = F.interpolate(logits_of(batch["images"]), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        evaluator.process(logits.argmax(1), labels)
    return evaluator.evaluate()["mIoU"]


def report(name: str, args, miou: float) -> float:
    head = "softmax" if args.softmax else "ProtoSeg"
    print(f"{name} {head}: val mIoU {miou:.4f} after {args.iterations} iterations, {time.time() - args.started:.0f} s")
    return miou
