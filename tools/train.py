"""Train a segmentation model.

    python tools/train.py CONFIG [section.key=value ...] [--resume [PATH]] [--stop-after N]
    torchrun --nproc-per-node=N tools/train.py CONFIG ...      (NCCL on GPUs, gloo on CPU)

Writes under the run folder (output_dir, default runs/<name>): config.yaml (the resolved
config), iter_*.pth and checkpoint_last.pth, log.jsonl, tensorboard/, eval_results.json.
Exit status: 0 done; 3 non-finite loss; 75 stopped by SIGTERM/SIGINT after saving (resume).
"""

import argparse
import os
import sys

import torch  # noqa: F401  (loads libtorch before protoseg's extension)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.config import ConfigError, load_config  # noqa: E402
from protoseg.data.datasets import SampleError  # noqa: E402
from protoseg.engine.trainer import EXIT_INTERRUPTED, EXIT_NONFINITE, NonFiniteLoss, train  # noqa: E402
from protoseg.models.backbones import WeightsError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--resume", nargs="?", const="auto", default="",
                        help="continue from PATH, or without PATH from the run's newest readable checkpoint")
    parser.add_argument("--stop-after", type=int, default=0, metavar="N",
                        help="stop with a checkpoint after iteration N (the schedule still spans all)")
    args = parser.parse_intermixed_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        status = train(cfg, resume=args.resume, stop_after=args.stop_after)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (FileExistsError, FileNotFoundError, ConfigError, WeightsError) as e:
        # the run folder, the data set's files, the config against the data, the backbone's weights
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SampleError as e:  # from a loader worker its message ends with the original error's line
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('protoseg.data.datasets.SampleError: ')}",
              file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return EXIT_INTERRUPTED if status == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
