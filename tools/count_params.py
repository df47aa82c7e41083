"""Parameter counts of configs' models, as a Markdown table (what docs/configs.md's table shows).

    python tools/count_params.py configs/*.yaml

Each model is built as its config says, pretrained weights off (the count is the same), and
counted by part: backbone, decoder, head (projection + prototype classifier's norms, or the
1x1 softmax classifier) and in all. Prototypes are a buffer, not parameters.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.config import ConfigError, load_config  # noqa: E402
from protoseg.models.backbones import count_parameters  # noqa: E402
from protoseg.models.segmentor import build_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()
    print("| config | backbone | decoder | head | total |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path in args.configs:
        try:
            cfg = load_config(path, ["model.pretrained=false", "model.backbone_checkpoint=''"])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        model = build_model(cfg)
        parts = [count_parameters(model.backbone), count_parameters(model.decoder)]
        total = count_parameters(model)
        cells = [f"{n / 1e6:.2f}M" for n in (*parts, total - sum(parts), total)]
        print(f"| `{os.path.basename(path)}` | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
