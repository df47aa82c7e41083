"""Evaluate a checkpoint, or write its predictions for a benchmark server.

    python tools/test.py [CONFIG] CHECKPOINT [section.key=value ...] [--save-pred DIR] [--limit N]
    python tools/test.py [CONFIG] CHECKPOINT data.val_split=test --format-only DIR

Without CONFIG the config stored in the checkpoint is used; overrides apply on top either way.
The test protocol is the config's `test:` section: whole image (default), sliding window, and
multi-scale + flip, e.g. test.mode=slide test.crop_size=[512,1024] test.stride=[341,682]
test.scales=[0.75,1.0,1.25] test.flip=true.

Evaluates on the config's val split, or on any folder pair given by overrides:
data.val_images=path/to/images data.val_labels=path/to/labels (labels: <image stem>.png).
Prints per-class IoU/Acc, mIoU, mAcc, aAcc and writes them as JSON (--out, default
test_results.json next to the checkpoint). --save-pred writes input | ground truth | prediction
panels, colourised.

--format-only DIR evaluates nothing and needs no labels: it writes DIR/<image stem>.png per
image in the ids the data set's official evaluation reads (Cityscapes: label ids, the files
cityscapesscripts and the test server take; ADE20K: 1..150; otherwise the class ids).
Works under torchrun too (images are sharded over ranks; the confusion matrix is summed).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.config import ConfigError, config_from_dict, load_config  # noqa: E402
from protoseg.data.datasets import class_names  # noqa: E402
from protoseg.data.loader import build_image_loader, build_val_loader, prepare_data  # noqa: E402
from protoseg.engine.checkpoint import load_checkpoint  # noqa: E402
from protoseg.engine.distributed import barrier, init_distributed  # noqa: E402
from protoseg.engine.evaluator import SegEvaluator, format_table, save_results  # noqa: E402
from protoseg.engine.outputs import png_name, submission_image, write_png  # noqa: E402
from protoseg.engine.predict import check_test_config, evaluate_model, predict_loader  # noqa: E402
from protoseg.models.segmentor import build_model  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT [section.key=value ...]")
    parser.add_argument("--save-pred", default="", metavar="DIR", help="write colourised predictions here")
    parser.add_argument("--limit", type=int, default=0, metavar="N",
                        help="save at most N predictions (0: all)")
    parser.add_argument("--out", default="",
                        help="results JSON (default: test_results.json next to the checkpoint)")
    parser.add_argument("--format-only", default="", metavar="DIR",
                        help="write submission PNGs here instead of evaluating (no labels needed)")
    args = parser.parse_args()
    first, rest = args.paths[0], args.paths[1:]
    if first.endswith((".yaml", ".yml")):
        if not rest or "=" in rest[0]:
            parser.error(f"a CHECKPOINT must follow the config {first}")
        args.config, args.checkpoint, args.overrides = first, rest[0], rest[1:]
    else:
        args.config, args.checkpoint, args.overrides = "", first, rest
    return args


def main() -> int:
    args = parse_args()
    try:
        state = load_checkpoint(args.checkpoint)
    except (OSError, RuntimeError) as e:
        print(f"error: cannot load checkpoint {args.checkpoint}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        if args.config:
            cfg = load_config(args.config, args.overrides)
        elif isinstance(state.get("config"), dict):
            cfg = config_from_dict(state["config"], args.checkpoint, args.overrides)
        else:
            raise ConfigError(f"{args.checkpoint} holds no config: give the config file before it")
        check_test_config(cfg.test)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed()
    if rank == 0 and not cfg.data.val_images:
        prepare_data(cfg)
    barrier()
    cfg.model.pretrained, cfg.model.backbone_checkpoint = False, ""  # the checkpoint has every weight
    model = build_model(cfg).to(device)
    model.load_state_dict(state["model"])
    d, t = cfg.data, cfg.test
    windows = f" crop {t.crop_size} stride {t.stride}" if t.mode == "slide" else ""
    protocol = f"test.mode={t.mode}{windows}, scales {t.scales}, flip {str(t.flip).lower()}"
    if args.format_only:
        loader = build_image_loader(cfg, rank, world)
        names = [png_name(p) for p in loader.dataset.paths]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            print(f"error: two images would both be written as {duplicate}", file=sys.stderr)
            return 2
        for batch, pred in predict_loader(model, loader, device, t, cfg.train.amp):
            for index, p in zip(batch["indices"].tolist(), pred.cpu().numpy()):
                ids = submission_image(p, d.dataset, d.num_classes)
                write_png(os.path.join(args.format_only, names[index]), ids)
        barrier()
        if rank == 0:
            print(f"{args.checkpoint} (iteration {state.get('iteration')}), {protocol}: wrote "
                  f"{len(names)} predictions to {args.format_only}")
    else:
        loader = build_val_loader(cfg, rank, world)
        evaluator = SegEvaluator(d.num_classes, class_names(d.dataset, d.num_classes), d.ignore_index)
        save_dir = args.save_pred
        if save_dir and world > 1:
            save_dir = os.path.join(save_dir, f"rank{rank}")
        started = time.perf_counter()
        results = evaluate_model(model, loader, evaluator, device, t, cfg.train.amp, save_dir, args.limit)
        if rank == 0:
            print(f"{args.checkpoint} (iteration {state.get('iteration')}) on {len(loader.dataset)} images, "
                  f"{protocol}: {time.perf_counter() - started:.1f} s")
            print(format_table(results))
            folder = os.path.dirname(os.path.abspath(args.checkpoint))
            out = args.out or os.path.join(folder, "test_results.json")
            save_results(results, out)
            saved = f"; predictions in {args.save_pred}" if args.save_pred else ""
            print(f"results written to {out}{saved}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
