"""Evaluate a checkpoint with whole-image inference.

    python tools/test.py CONFIG CHECKPOINT [section.key=value ...] [--save-pred DIR] [--limit N]

Evaluates on the config's val split, or on any folder pair given by overrides:
data.val_images=path/to/images data.val_labels=path/to/labels (labels: <image stem>.png).
Prints per-class IoU/Acc, mIoU, mAcc, aAcc and writes them as JSON (--out, default
test_results.json next to the checkpoint). --save-pred writes input | ground truth | prediction
panels, colourised. Works under torchrun too (the confusion matrix is summed over ranks).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.config import ConfigError, load_config  # noqa: E402
from protoseg.data.datasets import class_names  # noqa: E402
from protoseg.data.loader import build_val_loader, prepare_data  # noqa: E402
from protoseg.engine.checkpoint import load_checkpoint  # noqa: E402
from protoseg.engine.distributed import barrier, init_distributed  # noqa: E402
from protoseg.engine.evaluator import SegEvaluator, format_table, save_results  # noqa: E402
from protoseg.engine.inference import evaluate_model  # noqa: E402
from protoseg.models.segmentor import build_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--save-pred", default="", metavar="DIR", help="write colourised predictions here")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="save at most N predictions (0: all)")
    parser.add_argument("--out", default="",
                        help="results JSON (default: test_results.json next to the checkpoint)")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed()
    if rank == 0 and not cfg.data.val_images:
        prepare_data(cfg)
    barrier()
    cfg.model.pretrained, cfg.model.backbone_checkpoint = False, ""  # the checkpoint has every weight
    model = build_model(cfg).to(device)
    state = load_checkpoint(args.checkpoint)
    model.load_state_dict(state["model"])
    d = cfg.data
    loader = build_val_loader(cfg, rank, world)
    evaluator = SegEvaluator(d.num_classes, class_names(d.dataset, d.num_classes), d.ignore_index)
    save_dir = os.path.join(args.save_pred, f"rank{rank}") if args.save_pred and world > 1 else args.save_pred
    results = evaluate_model(model, loader, evaluator, device, cfg.train.amp, save_dir, args.limit)
    if rank == 0:
        print(f"{args.checkpoint} (iteration {state.get('iteration')}) on {len(loader.dataset)} images")
        print(format_table(results))
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "test_results.json")
        save_results(results, out)
        print(f"results written to {out}" + (f"; predictions in {args.save_pred}" if args.save_pred else ""))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
