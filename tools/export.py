"""Export a checkpoint for deployment: torch.export program, AOTInductor package or ONNX.

    python tools/export.py CHECKPOINT --format pt2|aoti|onnx --out FILE [--open-set] [--verify]
                           [--device cpu|cuda] [section.key=value ...]

The exported program takes a normalised float32 image batch [B, 3, H, W] of any B and any
H, W larger than the network's stride (32 for HRNet) and returns the logits [B, K, H, W] at the
input's size, and with --open-set also the open-set score [B, 1, H, W] (1 - the largest cosine
to any prototype; prototype classifiers only). The config stored in the checkpoint gives the
model and the preprocessing, written into the file's metadata: mean, std (network channel
order, 0-255 scale), channel_order, outputs, size_divisor, class_names. protoseg's operators
are decomposed into standard ones: the deployment side needs torch (pt2, aoti) or an ONNX
runtime, not protoseg (docs/export.md). An aoti package runs on the kind of device it was
exported on (--device).

--verify then runs the written file with its own runtime on the config's val split (or
data.val_images=... data.val_labels=... given as overrides) beside the eager model and prints
the largest logit difference, the argmax agreement and the mIoU of both.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.export import FORMATS, export_checkpoint, verify_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, metavar="FILE")
    parser.add_argument("--open-set", action="store_true", help="also output the open-set score")
    parser.add_argument("--device", default="cpu", help="export on this device (default cpu)")
    parser.add_argument("--verify", action="store_true", help="compare the export with the eager model on val")
    args = parser.parse_intermixed_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.format, args.out, open_set=args.open_set, device=args.device,
                          overrides=args.overrides)
    except OSError as e:  # writing failed midway (disk full...): nothing was left at --out
        print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad arguments, an unreadable checkpoint, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format}{', with the open-set score' if args.open_set else ''})")
    if args.verify:
        r = verify_checkpoint(args.checkpoint, args.out, args.format, open_set=args.open_set,
                              overrides=args.overrides, device=args.device)
        sizes = ", ".join(f"{h}x{w}" for h, w in r["sizes"])
        score = f", max |open-set score diff| {r['score_max_abs_diff']:.2e}" if args.open_set else ""
        print(f"verified on {r['images']} val images ({sizes}): max |logit diff| {r['max_abs_diff']:.2e}{score}, "
              f"argmax agreement {100 * r['argmax_agreement']:.4f}%, mIoU {100 * r['miou_exported']:.2f} "
              f"(exported) vs {100 * r['miou_eager']:.2f} (eager)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
