"""Convert a checkpoint of the released ProtoSeg code (tfzhou/ProtoSeg: HRNet_W48_Proto, or its
softmax baseline HRNet_W48) into a protoseg checkpoint.

    python tools/convert_released.py RELEASED.pth --config CONFIG --out OUT.pth [section.key=value ...]

CONFIG gives the data and test settings (configs/cityscapes_hrnet48_protoseg.yaml for the
Cityscapes models); the model section is set to the released network and its training
behaviour (protoseg/models/released.py, docs/fidelity.md). OUT is an ordinary protoseg
checkpoint: tools/test.py, tools/infer.py and Predictor take it, and `tools/train.py CONFIG
--resume OUT.pth` fine-tunes from it. A file that cannot be converted is one line, exit 2.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.config import ConfigError, config_to_dict, load_config  # noqa: E402
from protoseg.engine.checkpoint import atomic_save  # noqa: E402
from protoseg.models.released import (ReleasedCheckpointError, convert_state, read_released,  # noqa: E402
                                      released_architecture, released_config)
from protoseg.models.segmentor import build_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("released", help="the released code's checkpoint (.pth)")
    parser.add_argument("--config", required=True, help="the protoseg config for data and test settings")
    parser.add_argument("--out", required=True, help="the protoseg checkpoint to write")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to CONFIG first")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        state = read_released(args.released)
        architecture = released_architecture(state, args.released)
        cfg = released_config(cfg, state, architecture)
        model = build_model(cfg)
        converted = convert_state(state, architecture, model.state_dict(), args.released)
        model.load_state_dict(converted)  # strict: every tensor of the model, and only those
    except (ConfigError, ReleasedCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        print(f"error: --out {args.out}: the folder {out_dir} does not exist", file=sys.stderr)
        return 2
    # The converted tensors themselves, in their own dtype (the model above only checked them).
    atomic_save({"model": converted, "config": config_to_dict(cfg), "iteration": 0,
                 "converted_from": os.path.abspath(args.released), "architecture": architecture}, args.out)
    print(f"{args.released}: released {architecture} -> {args.out} ({len(converted)} tensors, "
          f"config {cfg.name} with the released model settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
