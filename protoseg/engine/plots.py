"""The figures of tools/visualize.py, drawn with matplotlib on the Agg backend (no display).

Every figure has a fixed size in pixels (figsize x DPI, no tight bounding box), titles, a
class-name legend, and the class palette of protoseg/engine/outputs.py, so a class has the same
colour in every figure and in the prediction panels. Files are written atomically.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from protoseg.engine.checkpoint import atomic_write  # noqa: E402
from protoseg.engine.outputs import colorize, palette  # noqa: E402

DPI = 100
# Width and height in pixels of each figure (tests check them).
EMBEDDING_SIZE = (1400, 640)
USAGE_SIZE = (1400, 900)
ROW_WIDTH, ROW_HEIGHT = 1200, 300  # the per-image figures: one row per image


def _colours(class_names: list[str]) -> np.ndarray:
    return palette(class_names).astype(np.float64) / 255


def _figure(size: tuple[int, int]):
    return plt.figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")


def _save(fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _legend(fig, class_names: list[str], present=None, **kwargs) -> None:
    colours = _colours(class_names)
    shown = range(len(class_names)) if present is None else sorted(present)
    handles = [Patch(facecolor=colours[k], edgecolor="black", label=class_names[k]) for k in shown]
    fig.legend(handles=handles, title="class", loc="outside right upper", **kwargs)


def plot_embeddings(path: str, projections: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
                    prototype_classes: np.ndarray, class_names: list[str], title: str) -> None:
    """One panel per projection name -> (pixels [n, 2], prototypes [K*M, 2]): pixels as dots
    coloured by their class (labels [n]), every prototype as a star in its class's colour
    (prototype_classes [K*M]) with a black edge, drawn on top."""
    colours = _colours(class_names)
    fig = _figure(EMBEDDING_SIZE)
    axes = fig.subplots(1, len(projections))
    for ax, (name, (pixels, protos)) in zip(np.atleast_1d(axes), projections.items()):
        # opaque enough that a black (background) dot does not read as grey, another class's colour
        ax.scatter(pixels[:, 0], pixels[:, 1], c=colours[labels], s=5, alpha=0.85, linewidths=0)
        ax.scatter(protos[:, 0], protos[:, 1], c=colours[prototype_classes], s=140, marker="*",
                   edgecolors="black", linewidths=0.8)
        ax.set_title(f"{name}: {len(pixels)} val pixels (dots), {len(protos)} prototypes (stars)")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    _legend(fig, class_names)
    _save(fig, path)


def prototype_shades(class_names: list[str], num_prototypes: int) -> np.ndarray:
    """[K, M, 3] float RGB: prototype m of class k as a shade of the class's colour, from dark
    (m = 0) to light (m = M - 1)."""
    base = _colours(class_names)[:, None, :]
    dark, light = 0.4 * base, base + 0.6 * (1 - base)  # a black class still gets black .. grey
    t = np.linspace(0, 1, num_prototypes)[None, :, None]
    return dark + (light - dark) * t


def plot_assignments(path: str, rows: list[dict], class_names: list[str], num_prototypes: int,
                     ignore_index: int, title: str) -> None:
    """For each image (rows: "image" [H, W, 3] uint8, "label", "pred" [H, W], "nearest" [h, w],
    the nearest prototype of the predicted class, "nearest_class" [h, w] that class): the image,
    ground truth, prediction and the prototype map, each prototype a shade of its class."""
    k = len(class_names)
    colours = palette(class_names)
    shades = prototype_shades(class_names, num_prototypes)
    fig = _figure((ROW_WIDTH, ROW_HEIGHT * len(rows)))
    axes = np.atleast_2d(fig.subplots(len(rows), 4))
    present = set()
    for ax_row, row in zip(axes, rows):
        present.update(int(c) for c in np.unique(row["pred"]) if c < k)
        present.update(int(c) for c in np.unique(row["label"]) if c < k)
        panels = [("image", row["image"]), ("ground truth (white: ignore/unknown)",
                                            colorize(row["label"], colours, ignore_index)),
                  ("prediction", colorize(row["pred"], colours, ignore_index)),
                  (f"nearest prototype of the predicted class\n(shade = prototype 0..{num_prototypes - 1})",
                   shades[row["nearest_class"], row["nearest"]])]
        for ax, (name, picture) in zip(ax_row, panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    _legend(fig, class_names, present)
    _save(fig, path)


def plot_usage(path: str, stats: dict, title: str) -> None:
    """The statistics of protoseg/engine/prototypes.py per class: the share of each prototype
    (stacked, prototype 0 at the bottom, shades of the class colour), the usage entropy, the
    dead prototypes and the mean intra-class cosine."""
    names = list(stats["classes"])
    per_class = [stats["classes"][n] for n in names]
    m = len(per_class[0]["shares"])
    shades = prototype_shades(names, m)
    x = np.arange(len(names))
    fig = _figure(USAGE_SIZE)
    (shares_ax, entropy_ax), (dead_ax, cosine_ax) = fig.subplots(2, 2)
    bottom = np.zeros(len(names))
    for j in range(m):
        heights = np.array([c["shares"][j] for c in per_class])
        shares_ax.bar(x, heights, bottom=bottom, color=shades[:, j], edgecolor="white", linewidth=0.3)
        bottom += heights
    shares_ax.set_title(f"share of the class's correct pixels won by each of its {m} prototypes")
    shares_ax.set_ylim(0, 1)
    colours = _colours(names)
    bars = [(entropy_ax, "entropy", "usage entropy (1 = even, 0 = one prototype takes all)", (0, 1.05)),
            (dead_ax, "dead", f"dead prototypes (win no pixel; of {m})", (0, m + 0.2)),
            (cosine_ax, "cosine", "mean cosine between the class's prototypes (1 = collapsed)", (-0.1, 1.05))]
    for ax, key, name, limits in bars:
        values = np.array([np.nan if c[key] is None else c[key] for c in per_class], dtype=float)
        ax.bar(x, np.nan_to_num(values), color=colours, edgecolor="black", linewidth=0.5)
        ax.set_title(name)
        ax.set_ylim(*limits)
    for ax in (shares_ax, entropy_ax, dead_ax, cosine_ax):
        ax.set_xticks(x, names, rotation=45 if len(names) > 12 else 0, fontsize=8)
        ax.set_xlabel("class")
    fig.suptitle(f"{title}: entropy {stats['entropy']:.2f}, dead {stats['dead']}/{stats['prototypes']}, "
                 f"intra-class cosine {stats['cosine']:.2f}")
    _save(fig, path)


def plot_similarity(path: str, rows: list[dict], class_names: list[str], ignore_index: int,
                    title: str) -> None:
    """For each image (rows: "image", "label", "similarity" [H, W] the largest cosine to any
    prototype): the image, the ground truth and the similarity as a heat map with its scale."""
    colours = palette(class_names)
    fig = _figure((ROW_WIDTH * 3 // 4, ROW_HEIGHT * len(rows)))
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    for ax_row, row in zip(axes, rows):
        ax_row[0].imshow(row["image"])
        ax_row[0].set_title("image", fontsize=9)
        ax_row[1].imshow(colorize(row["label"], colours, ignore_index), interpolation="nearest")
        ax_row[1].set_title("ground truth (white: ignore/unknown)", fontsize=9)
        heat = ax_row[2].imshow(row["similarity"], cmap="viridis", vmin=0, vmax=1)
        ax_row[2].set_title("cosine to the nearest prototype", fontsize=9)
        fig.colorbar(heat, ax=ax_row[2], fraction=0.05)
        for ax in ax_row:
            ax.axis("off")
    fig.suptitle(title)
    present = set()
    for row in rows:
        present.update(int(c) for c in np.unique(row["label"]) if c < len(class_names))
    _legend(fig, class_names, present)
    _save(fig, path)

