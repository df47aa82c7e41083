"""Fit the von Mises-Fisher open-set score ("vmf", protoseg/engine/anomaly.py) of a ProtoSeg
checkpoint: one pass over the training split (whole images, no augmentation) collects, for every
prototype, the correctly classified pixels it is nearest to, and fits the concentration of their
embeddings around it.

    python tools/fit_open_set.py CHECKPOINT [section.key=value ...] [--out FILE]

Writes FILE (default: <checkpoint>.vmf.pt beside the file the checkpoint path resolves to), which
tools/test.py --anomaly vmf and protoseg.Predictor read. Prints how many prototypes were fitted
and the range of their concentrations. Works under torchrun (images sharded, sums reduced).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.data.loader import build_val_loader, prepare_data  # noqa: E402
from protoseg.engine.anomaly import fit_path  # noqa: E402
from protoseg.engine.checkpoint import atomic_save, load_run  # noqa: E402
from protoseg.engine.distributed import barrier, init_distributed  # noqa: E402
from protoseg.engine.prototypes import fit_vmf  # noqa: E402
from protoseg.models.segmentor import load_trained_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--out", default="", help="the fit's file (default: <checkpoint>.vmf.pt)")
    args = parser.parse_intermixed_args()
    try:
        state, cfg = load_run(args.checkpoint, "", args.overrides)
    except ValueError as e:  # the checkpoint or its config, in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.classifier != "prototype":
        print(f"error: {args.checkpoint} is a {cfg.model.classifier} classifier; the vmf score needs "
              f"model.classifier prototype", file=sys.stderr)
        return 2
    out = args.out or fit_path(args.checkpoint)
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        print(f"error: --out {out}: its folder does not exist", file=sys.stderr)
        return 2
    rank, world, device = init_distributed()
    # The training images, read as for evaluation (whole, one scale, no augmentation).
    cfg.data.val_split, cfg.data.val_images, cfg.data.val_labels = cfg.data.train_split, "", ""
    if rank == 0:
        prepare_data(cfg)
    barrier()
    model = load_trained_model(cfg, state).to(device)
    fit = fit_vmf(model, build_val_loader(cfg, rank, world), device, cfg.train.amp)
    if rank == 0:
        atomic_save(fit, out)
        used = fit["count"] > 0
        kappa = fit["kappa"][used]
        print(f"{args.checkpoint}: fitted {int(used.sum())} of {used.numel()} prototypes on "
              f"{int(fit['count'].sum())} correctly classified training pixels (the others win none); "
              f"concentration {kappa.min():.1f} .. {kappa.max():.1f}, median {kappa.median():.1f}; "
              f"written to {out}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
