"""Evaluate a checkpoint, or write its predictions for a benchmark server.

    python tools/test.py [CONFIG] CHECKPOINT [section.key=value ...] [--save-pred DIR] [--limit N]
    python tools/test.py [CONFIG] CHECKPOINT data.val_split=test --format-only DIR
    python tools/test.py [CONFIG] CHECKPOINT --anomaly [SCORE ...] (a val split with data.unknown_index)

Without CONFIG the config stored in the checkpoint is used; overrides apply on top either way.
The test protocol is the config's `test:` section: whole image (default), sliding window, and
multi-scale + flip, e.g. test.mode=slide test.crop_size=[512,1024] test.stride=[341,682]
test.scales=[0.75,1.0,1.25] test.flip=true.

Evaluates on the config's val split, or on any folder pair given by overrides:
data.val_images=path/to/images data.val_labels=path/to/labels (labels: <image stem>.png).
Prints per-class IoU/Acc, mIoU, mAcc, aAcc (and for a prototype model the prototype usage
statistics) and writes them as JSON (--out, default test_results.json next to the checkpoint).
--save-pred writes input | ground truth | prediction panels, colourised.

--anomaly also scores each pixel as open set with each named score (protoseg/engine/anomaly.py:
msp, max_logit, energy; for the prototype classifier also cosine, proto_energy and vmf, which
needs tools/fit_open_set.py's fit; no name: every score the model offers, vmf when its fit
exists) and reports how each separates the pixels labelled data.unknown_index (classes unseen
in training) from those of the known classes: AUROC, average precision and the false-positive
rate at 95% true-positive rate, on the same pixels for every score. The segmentation metrics
are then over the known classes (unknown pixels left out). --fit FILE: the vmf fit (default:
beside the checkpoint, <checkpoint>.vmf.pt).

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

from protoseg.data.datasets import class_names  # noqa: E402
from protoseg.data.loader import build_image_loader, build_val_loader, prepare_data  # noqa: E402
from protoseg.engine.anomaly import (AnomalyEvaluator, check_scores, fit_path, format_anomaly, load_fit,  # noqa: E402
                                     offered_scores)
from protoseg.engine.checkpoint import load_run  # noqa: E402
from protoseg.engine.distributed import barrier, init_distributed  # noqa: E402
from protoseg.engine.evaluator import SegEvaluator, format_table, save_results  # noqa: E402
from protoseg.engine.outputs import png_name, submission_image, write_png  # noqa: E402
from protoseg.engine.predict import check_test_config, evaluate_model, predict_loader  # noqa: E402
from protoseg.engine.prototypes import format_statistics, usage_statistics, val_usage  # noqa: E402
from protoseg.models.segmentor import load_trained_model  # noqa: E402


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
    parser.add_argument("--anomaly", nargs="*", default=None, metavar="SCORE",
                        help="also evaluate open-set scores (default: all) on pixels labelled data.unknown_index")
    parser.add_argument("--fit", default="", metavar="FILE",
                        help="the vmf score's fit (default: <checkpoint>.vmf.pt beside the checkpoint)")
    args = parser.parse_intermixed_args()
    first, rest = args.paths[0], args.paths[1:]
    if first.endswith((".yaml", ".yml")):
        if not rest or "=" in rest[0]:
            parser.error(f"a CHECKPOINT must follow the config {first}")
        args.config, args.checkpoint, args.overrides = first, rest[0], rest[1:]
    else:
        args.config, args.checkpoint, args.overrides = "", first, rest
    return args


def open_set_options(args, cfg, model) -> tuple[AnomalyEvaluator, dict | None]:
    """The evaluator of the scores --anomaly names (all the model offers by default, vmf only
    where its fit exists) and the vmf fit when used; ValueError naming the option or file."""
    path = args.fit or fit_path(args.checkpoint)
    if args.fit and not os.path.exists(args.fit):
        raise ValueError(f"--fit {args.fit} does not exist")
    names = args.anomaly or [n for n in offered_scores(model) if n != "vmf" or os.path.exists(path)]
    check_scores(names, model)
    evaluator = AnomalyEvaluator(cfg.data.num_classes, cfg.data.unknown_index, names)
    return evaluator, load_fit(path, model) if "vmf" in names else None


def main() -> int:
    args = parse_args()
    try:
        state, cfg = load_run(args.checkpoint, args.config, args.overrides)
        check_test_config(cfg.test)
    except ValueError as e:  # the checkpoint, its config or the test protocol, in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, world, device = init_distributed()
    if rank == 0 and not cfg.data.val_images:
        prepare_data(cfg)
    barrier()
    model = load_trained_model(cfg, state).to(device)
    fit, anomaly = None, None
    if args.anomaly is not None:
        try:
            anomaly, fit = open_set_options(args, cfg, model)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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
        for batch, pred, _ in predict_loader(model, loader, device, t, cfg.train.amp):
            for index, p in zip(batch["indices"].tolist(), pred.cpu().numpy()):
                ids = submission_image(p, d.dataset, d.num_classes)
                write_png(os.path.join(args.format_only, names[index]), ids)
        barrier()
        if rank == 0:
            print(f"{args.checkpoint} (iteration {state.get('iteration')}), {protocol}: wrote "
                  f"{len(names)} predictions to {args.format_only}")
    else:
        loader = build_val_loader(cfg, rank, world)
        evaluator = SegEvaluator(d.num_classes,
                                 class_names(d.dataset, d.num_classes, d.unknown_digits, d.unknown_classes),
                                 d.ignore_index, d.unknown_index)
        save_dir = args.save_pred
        if save_dir and world > 1:
            save_dir = os.path.join(save_dir, f"rank{rank}")
        started = time.perf_counter()
        results = evaluate_model(model, loader, evaluator, device, t, cfg.train.amp, save_dir, args.limit,
                                 anomaly, fit)
        elapsed = time.perf_counter() - started
        if anomaly is not None:
            results["anomaly"] = anomaly.evaluate()
        if model.uses_prototypes:
            counts = val_usage(model, loader, device, cfg.train.amp)
            results["prototypes"] = usage_statistics(counts, model.classifier.prototypes,
                                                     evaluator.class_names)
        if rank == 0:
            print(f"{args.checkpoint} (iteration {state.get('iteration')}) on {len(loader.dataset)} images, "
                  f"{protocol}: {elapsed:.1f} s")
            print(format_table(results))
            if "prototypes" in results:
                print(format_statistics(results["prototypes"]))
            if "anomaly" in results:
                print(format_anomaly(results["anomaly"]))
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
