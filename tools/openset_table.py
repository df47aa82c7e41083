"""Print the open-set table of `make openset` from tools/test.py --anomaly results.

    python tools/openset_table.py NAME=RESULTS.json [NAME=RESULTS.json ...]

One Markdown row per run: AUROC, average precision and FPR at 95% TPR of the open-set score
(unknown pixels against known ones), and the mIoU over the known classes, all in percent.
"""

import json
import sys


def table(runs: list[tuple[str, dict]]) -> str:
    lines = ["| classifier | AUROC | AP | FPR@95 | known-class mIoU |", "| --- | --- | --- | --- | --- |"]
    for name, results in runs:
        a = results["anomaly"]
        lines.append(f"| {name} | {100 * a['AUROC']:.2f} | {100 * a['AP']:.2f} | {100 * a['FPR@95']:.2f} | "
                     f"{100 * results['mIoU']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    runs = []
    for item in argv:
        name, sep, path = item.partition("=")
        if not sep:
            print(f"error: {item!r} must be NAME=RESULTS.json", file=sys.stderr)
            return 2
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 2
        if "anomaly" not in results:
            print(f"error: {path} has no open-set results (run tools/test.py with --anomaly)",
                  file=sys.stderr)
            return 2
        runs.append((name, results))
    if not runs:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
