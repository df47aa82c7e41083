"""Convert a checkpoint of the released ProtoSeg code (tfzhou/ProtoSeg: HRNet_W48_Proto, or its
softmax baseline HRNet_W48) into a protoseg checkpoint.

    python tools/convert_released.py RELEASED.pth --config CONFIG --out OUT.pth [section.key=value ...]

CONFIG gives the data and test settings (configs/cityscapes_hrnet48_protoseg.yaml for the
Cityscapes models); the model section is set to the released network and its training
behaviour (protoseg/models/released.py, docs/fidelity.md). OUT is an ordinary protoseg
checkpoint: tools/test.py, tools/infer.py and Predictor take it. Beside it, OUT with .yaml for
.pth is its config, to fine-tune with: `tools/train.py OUT.yaml --resume OUT.pth`. A file that
cannot be converted is one line, exit 2.
"""

import argparse
import os
import sys

import torch  # noqa: F401  (loads libtorch before protoseg's extension)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.config import config_to_dict, load_config, save_config  # noqa: E402
from protoseg.engine.checkpoint import atomic_save  # noqa: E402
from protoseg.models.released import (convert_state, read_released,  # noqa: E402
                                      released_architecture, released_config)
from protoseg.models.segmentor import build_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("released", help="the released code's checkpoint (.pth)")
    parser.add_argument("--config", required=True, help="the protoseg config for data and test settings")
    parser.add_argument("--out", required=True, help="the protoseg checkpoint to write")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to CONFIG first")
    args = parser.parse_intermixed_args()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        print(f"error: --out {args.out}: the folder {out_dir} does not exist", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        state = read_released(args.released)
        architecture = released_architecture(state, args.released)
        cfg = released_config(cfg, state, architecture)
        model = build_model(cfg)  # ValueError: a config value no model has
        converted = convert_state(state, architecture, model.state_dict(), args.released)
        model.load_state_dict(converted)  # strict: every tensor of the model, and only those
        # The converted tensors themselves, in their own dtype (the model above only checked
        # them), and beside them the config to fine-tune with.
        atomic_save({"model": converted, "config": config_to_dict(cfg), "iteration": 0,
                     "converted_from": os.path.abspath(args.released), "architecture": architecture}, args.out)
        config_path = os.path.splitext(args.out)[0] + ".yaml"
        save_config(cfg, config_path)
    except (ValueError, OSError) as e:  # ConfigError and ReleasedCheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.released}: released {architecture} -> {args.out} ({len(converted)} tensors) and its config "
          f"{config_path}, the released model settings over {args.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
