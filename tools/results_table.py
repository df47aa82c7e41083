"""Print several runs' tools/test.py results side by side, as one Markdown table.

    python tools/results_table.py NAME=RESULTS.json [NAME=RESULTS.json ...] [--anomaly] [--out JSON]

Default: one row per class with each run's IoU, then mIoU, mAcc and aAcc (in percent).
--anomaly: one row per (run, open-set score) with the score's AUROC, average precision and FPR
at 95% TPR (unknown pixels against known ones, the same pixels for every score) and the run's
known-class mIoU (results of tools/test.py --anomaly); the best of each column in bold per run.
--out also writes the runs' results as one JSON object {NAME: results}.
`make camvid` and `make openset` print their tables with it.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.engine.evaluator import save_results  # noqa: E402


def class_table(runs: list[tuple[str, dict]]) -> str:
    names = list(runs[0][1]["IoU"])
    for name, results in runs[1:]:
        if list(results["IoU"]) != names:
            raise ValueError(f"{name} has other classes than {runs[0][0]}: {list(results['IoU'])} vs {names}")
    lines = ["| class | " + " | ".join(name for name, _ in runs) + " |", "| --- |" + " ---: |" * len(runs)]
    for cls in names:
        lines.append(f"| {cls} | " + " | ".join(f"{100 * r['IoU'][cls]:.2f}" for _, r in runs) + " |")
    for key in ("mIoU", "mAcc", "aAcc"):
        lines.append(f"| **{key}** | " + " | ".join(f"**{100 * r[key]:.2f}**" for _, r in runs) + " |")
    return "\n".join(lines)


def anomaly_table(runs: list[tuple[str, dict]]) -> str:
    lines = ["| classifier | score | AUROC | AP | FPR@95 | known-class mIoU |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, results in runs:
        scores = results["anomaly"]
        best = {"AUROC": max(s["AUROC"] for s in scores.values()), "AP": max(s["AP"] for s in scores.values()),
                "FPR@95": min(s["FPR@95"] for s in scores.values())}
        for score, a in scores.items():
            cells = [f"**{100 * a[k]:.2f}**" if a[k] == best[k] else f"{100 * a[k]:.2f}" for k in best]
            lines.append(f"| {name} | {score} | " + " | ".join(cells) + f" | {100 * results['mIoU']:.2f} |")
    return "\n".join(lines)


def read_runs(items: list[str], anomaly: bool) -> list[tuple[str, dict]]:
    """[(NAME, results)] of NAME=RESULTS.json items; ValueError naming the item or file."""
    runs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{item!r} must be NAME=RESULTS.json")
        if name in dict(runs):
            raise ValueError(f"two runs are named {name}")
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        needed = "anomaly" if anomaly else "IoU"
        if not isinstance(results, dict) or needed not in results:
            hint = " (run tools/test.py with --anomaly)" if anomaly else ""
            raise ValueError(f"{path} holds no {'open-set' if anomaly else 'per-class'} results of "
                             f"tools/test.py{hint}")
        if anomaly and not all(isinstance(v, dict) for v in results["anomaly"].values()):
            raise ValueError(f"{path} holds one open-set score without its name (an older tools/test.py): "
                             f"run tools/test.py --anomaly again")
        runs.append((name, results))
    return runs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="NAME=RESULTS.json")
    parser.add_argument("--anomaly", action="store_true", help="the open-set table")
    parser.add_argument("--out", default="", help="also write {NAME: results} here as JSON")
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.runs, args.anomaly)
        print(anomaly_table(runs) if args.anomaly else class_table(runs))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        save_results(dict(runs), args.out)
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
