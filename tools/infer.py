"""Segment any images with a trained checkpoint (no config file, no labels).

    python tools/infer.py CHECKPOINT INPUT... --out DIR [test.key=value ...]
    torchrun --nproc-per-node=N tools/infer.py CHECKPOINT INPUT... --out DIR

INPUT: image files, folders (searched recursively) or quoted glob patterns ("photos/*.jpg").
For each image writes DIR/<stem>.png, the class ids (uint8; uint16 with more than 256
classes), and DIR/<stem>_overlay.png, the colourised prediction over the image with a legend
of the classes present. The model, preprocessing and test protocol come from the checkpoint;
test.* overrides change the protocol (test.mode=slide test.crop_size=[512,512]
test.stride=[341,341] test.scales=[0.75,1.0,1.25] test.flip=true).

An unreadable image is reported by name and the others continue; the exit status is 1 if
any image failed (2 for bad arguments). Under torchrun the images are sharded over the ranks.
"""

import argparse
import glob
import os
import sys

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg import Predictor  # noqa: E402
from protoseg.config import ConfigError  # noqa: E402
from protoseg.data.datasets import IMAGE_EXTENSIONS, SampleError, list_images, read_image  # noqa: E402
from protoseg.engine.distributed import init_distributed  # noqa: E402
from protoseg.engine.outputs import class_id_image, overlay, write_png  # noqa: E402


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(image paths in order, without repeats; inputs that named nothing)."""
    paths, unmatched = [], []
    for item in inputs:
        if os.path.isdir(item):
            try:
                found = list_images(item)
            except FileNotFoundError:
                found = []
        elif os.path.exists(item):
            found = [item]  # taken as given: if it is not an image, reading it fails and says so
        else:
            found = [p for p in sorted(glob.glob(item, recursive=True))
                     if os.path.isfile(p) and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
        if not found:
            unmatched.append(item)
        paths.extend(found)
    seen = set()
    unique = [p for p in paths if not (os.path.realpath(p) in seen or seen.add(os.path.realpath(p)))]
    return unique, unmatched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, glob patterns; "
                        "and test.key=value overrides")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the PNGs go")
    args = parser.parse_intermixed_args()
    overrides = [item for item in args.inputs if "=" in item and not os.path.exists(item)]
    inputs = [item for item in args.inputs if item not in overrides]
    test_options = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        if not key.startswith("test.") or key.count(".") != 1:
            parser.error(f"override {item!r}: only test.key=value overrides apply to a trained model")
        test_options[key[len("test."):]] = yaml.safe_load(raw)
    if not inputs:
        parser.error("no INPUT given")
    paths, unmatched = expand_inputs(inputs)
    for item in unmatched:
        print(f"error: {item}: no such file, or no images in it", file=sys.stderr)
    stems = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            print(f"error: {stems[stem]} and {path} would both be written as {stem}.png; "
                  f"predict them into different --out folders", file=sys.stderr)
            return 2
        stems[stem] = path

    rank, world, device = init_distributed()
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=device, **test_options)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    failed = 0
    for path in tqdm(paths[rank::world], disable=rank != 0, unit="image", dynamic_ncols=True):
        try:
            image = read_image(path)
        except SampleError as e:
            tqdm.write(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        pred = predictor.predict(image)
        stem = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0])
        write_png(stem + ".png", class_id_image(pred, predictor.cfg.data.num_classes))
        write_png(stem + "_overlay.png", overlay(image, pred, predictor.class_names))
    counts = torch.tensor([failed, len(paths[rank::world]) - failed], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
        torch.distributed.destroy_process_group()
    failed, written = int(counts[0]) + len(unmatched), int(counts[1])
    if rank == 0:
        print(f"{written} images segmented into {args.out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
