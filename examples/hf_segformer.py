"""Hugging Face transformers' SegformerForSemanticSegmentation (a small MiT-b0-sized config,
random init) trained on DigitScenes with ProtoSeg's prototype classifier in place of its
decode head's 1x1 conv (or, with --softmax, its own). Segformer computes its cross-entropy inside
its forward when given labels; the head's PPC/PPD are added to that loss.

    python examples/hf_segformer.py [--softmax] [--iterations 1500]

The CPU time of the default 1500 iterations, and the val mIoU each head reaches in them, are in
docs/integrations.md (--iterations fits another budget).
"""

from __future__ import annotations

import sys

from common import optimizer_step, report, start, val_miou
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from protoseg.integrations import prototype_head, replace_classifier


def main(argv=None) -> float:
    args, cfg, batches, val_loader = start(argv, __doc__)
    config = SegformerConfig(num_labels=cfg.data.num_classes, semantic_loss_ignore_index=cfg.data.ignore_index,
                             hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256)
    model = SegformerForSemanticSegmentation(config)
    if not args.softmax:
        model = replace_classifier(model, num_prototypes=10, proj_dim=64)  # ProtoSeg: 1 of 4 lines
        head = prototype_head(model)  # ProtoSeg: 2 of 4
    update = optimizer_step(model, args)
    model.train()
    for _ in range(args.iterations):
        images, labels = next(batches)
        if not args.softmax:
            head.set_labels(labels)  # ProtoSeg: 3 of 4 (optional: one fused pass, no extra GEMM)
        loss = model(pixel_values=images, labels=labels).loss
        if not args.softmax:
            ppc, ppd = head.loss()  # ProtoSeg: 4 of 4
            loss = loss + 0.01 * ppc + 0.001 * ppd
        update(loss)
    model.eval()
    miou = val_miou(cfg, val_loader, lambda images: model(pixel_values=images).logits)
    return report("transformers Segformer", args, miou)


if __name__ == "__main__":
    main(sys.argv[1:])
