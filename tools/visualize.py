"""Draw what the prototypes of a trained prototype model do, as PNGs in DIR.

    python tools/visualize.py CHECKPOINT --out DIR [--images N] [--points P] [section.key=value ...]

- embeddings.png: val pixel embeddings in 2-D, coloured by class, with every prototype on top
  (PCA and t-SNE of scikit-learn, side by side);
- assignments.png: for N val images, the image, ground truth, prediction, and which prototype
  of the predicted class each pixel is nearest to (a shade of the class colour per prototype);
- usage.png: per class, each prototype's share of the class's correctly classified val pixels,
  the usage entropy, dead prototypes and the mean intra-class cosine, as bar charts;
- similarity.png: for N val images, the cosine of each pixel to its nearest prototype.

The work is bounded: at most P pixels (an equal quota per class, sampled with a fixed seed)
from the first `--scan` val images go into PCA and t-SNE; the statistics use the whole val
split (one forward pass per image). The config is the checkpoint's, with the overrides on top.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protoseg.data.datasets import class_names, read_image  # noqa: E402
from protoseg.data.loader import build_val_loader, prepare_data  # noqa: E402
from protoseg.engine.checkpoint import load_run  # noqa: E402
from protoseg.engine.predict import eval_batches, pad_to_multiple, size_divisor  # noqa: E402
from protoseg.engine.prototypes import (feature_labels, format_statistics, usage_statistics,  # noqa: E402
                                        val_usage)
from protoseg.models.segmentor import load_trained_model  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")
    parser.add_argument("--images", type=int, default=4, metavar="N",
                        help="val images in the per-image figures")
    parser.add_argument("--points", type=int, default=2000, metavar="P",
                        help="val pixels embedded by PCA and t-SNE (an equal quota per class)")
    parser.add_argument("--scan", type=int, default=64, metavar="S",
                        help="the first S val images are sampled for the embedding figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_intermixed_args()
    for name in ("images", "points", "scan"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1 (got {getattr(args, name)})")
    return args


def sample_pixels(embeddings: list[np.ndarray], labels: list[np.ndarray], num_classes: int, points: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """At most points // K pixels of each class (all of a class that has fewer), uniformly."""
    x, y = np.concatenate(embeddings), np.concatenate(labels)
    quota = max(1, points // num_classes)
    keep = []
    for k in range(num_classes):
        members = np.flatnonzero(y == k)
        keep.append(rng.choice(members, min(quota, members.size), replace=False))
    keep = np.sort(np.concatenate(keep))
    return x[keep], y[keep]


def project(pixels: np.ndarray, prototypes: np.ndarray, seed: int) -> dict:
    """PCA and t-SNE of the pixels and prototypes together -> name: (pixels [n, 2], prototypes
    [K*M, 2]). t-SNE places the points it is given (it has no transform for new ones), so the
    prototypes are embedded along with the pixels."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    both = np.concatenate([pixels, prototypes]).astype(np.float32)
    n = len(pixels)
    pca = PCA(n_components=2, random_state=seed).fit(pixels).transform(both)
    perplexity = min(30.0, (len(both) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed,
                max_iter=750).fit_transform(both)
    return {"PCA": (pca[:n], pca[n:]), "t-SNE (cosine)": (tsne[:n], tsne[n:])}


def _resize(maps: torch.Tensor, size, height: int, width: int) -> torch.Tensor:
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[..., :height, :width]


@torch.no_grad()
def collect(model, loader, num_classes: int, scan: int, images: int):
    """From the first max(scan, images) val images: the unit embeddings [n, D] and feature
    resolution labels [n] (-1: ignore/unknown) of the first `scan`, and for the first `images`
    the maps of the per-image figures (at image size; the prototype map at feature size)."""
    divisor = size_divisor(model)
    embeddings, labels, rows, seen = [], [], [], 0
    for batch in eval_batches(model, loader):
        if seen >= max(scan, images):
            break
        count = min(len(batch["images"]), max(scan, images) - seen)
        height, width = batch["images"].shape[-2:]
        out = model.embed(pad_to_multiple(batch["images"][:count], divisor, 0.0))
        padded = pad_to_multiple(batch["labels"][:count], divisor, model.ignore_index)
        y = feature_labels(padded, out["logits"].shape[-2:], num_classes, model.ignore_index)
        # the feature maps cover the padded image: keep the part over the image itself
        h, w = -(-height * y.shape[-2] // padded.shape[-2]), -(-width * y.shape[-1] // padded.shape[-1])
        if seen < scan:
            e = out["embedding"][:, :, :h, :w].movedim(1, -1)
            embeddings.append(e.reshape(-1, e.shape[-1]).numpy())
            labels.append(y[:, :h, :w].reshape(-1).numpy())
        pred = _resize(out["logits"], padded.shape[-2:], height, width).argmax(1)
        similarity = _resize(out["similarity"].amax(1, keepdim=True), padded.shape[-2:], height, width)[:, 0]
        pred_feature = out["logits"].argmax(1)
        nearest = out["nearest"].gather(1, pred_feature[:, None])[:, 0]
        for i, index in enumerate(batch["indices"][:count].tolist()):
            if len(rows) < images:
                rows.append({"image": read_image(loader.dataset.pairs[index][0]),
                             "label": batch["labels"][i].numpy(), "pred": pred[i].numpy(),
                             "nearest": nearest[i, :h, :w].numpy(),
                             "nearest_class": pred_feature[i, :h, :w].numpy(),
                             "similarity": similarity[i].numpy()})
        seen += count
    return embeddings, labels, rows


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    try:
        state, cfg = load_run(args.checkpoint, overrides=args.overrides)
    except ValueError as e:  # the checkpoint or its config, in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.classifier != "prototype":
        print(f"error: {args.checkpoint} is a {cfg.model.classifier} model: visualize.py draws prototypes "
              f"(model.classifier = prototype)", file=sys.stderr)
        return 2
    from protoseg.engine import plots  # matplotlib, only once the arguments are known to be good

    d = cfg.data
    if not d.val_images:
        prepare_data(cfg)
    device = torch.device("cpu")
    model = load_trained_model(cfg, state).eval()
    names = class_names(d.dataset, d.num_classes, d.unknown_digits, d.unknown_classes)
    loader = build_val_loader(cfg, 0, 1)
    run = f"{cfg.name}, iteration {state.get('iteration')}"
    os.makedirs(args.out, exist_ok=True)

    stats = usage_statistics(val_usage(model, loader, device), model.classifier.prototypes, names)
    plots.plot_usage(os.path.join(args.out, "usage.png"), stats, f"prototype usage on val ({run})")

    embeddings, labels, rows = collect(model, loader, d.num_classes, args.scan, args.images)
    m = model.classifier.num_prototypes
    plots.plot_assignments(os.path.join(args.out, "assignments.png"), rows, names, m, d.ignore_index,
                           f"prototype assignments ({run})")
    plots.plot_similarity(os.path.join(args.out, "similarity.png"), rows, names, d.ignore_index,
                          f"similarity to the nearest prototype ({run})")
    rng = np.random.default_rng(args.seed)
    pixels, pixel_labels = sample_pixels(embeddings, labels, d.num_classes, args.points, rng)
    prototypes = F.normalize(model.classifier.prototypes, dim=-1)
    projections = project(pixels, prototypes.reshape(-1, prototypes.shape[-1]).numpy(), args.seed)
    plots.plot_embeddings(os.path.join(args.out, "embeddings.png"), projections, pixel_labels,
                          np.repeat(np.arange(d.num_classes), m), names,
                          f"val pixel embeddings and prototypes ({run})")
    print(format_statistics(stats))
    print(f"wrote embeddings.png, assignments.png, usage.png, similarity.png to {args.out} "
          f"({len(pixels)} pixels embedded, {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
