"""segmentation_models_pytorch's Unet (ResNet-18 encoder, encoder_weights=None) trained on
DigitScenes with ProtoSeg's prototype classifier in place of its segmentation head's 3x3 conv
(or, with --softmax, its own).

    python examples/smp_unet.py [--softmax] [--iterations 1500]

The CPU time of the default 1500 iterations, and the val mIoU each head reaches in them, are in
docs/integrations.md (--iterations fits another budget).
"""

from __future__ import annotations

import sys

import segmentation_models_pytorch as smp
import torch.nn.functional as F
from common import optimizer_step, report, start, val_miou

from protoseg.integrations import prototype_head, replace_classifier


def main(argv=None) -> float:
    args, cfg, batches, val_loader = start(argv, __doc__)
    model = smp.Unet("resnet18", encoder_weights=None, classes=cfg.data.num_classes)
    if not args.softmax:
        model = replace_classifier(model, num_prototypes=10, proj_dim=64)  # ProtoSeg: 1 of 3 lines
        head = prototype_head(model)  # ProtoSeg: 2 of 3
    update = optimizer_step(model, args)
    model.train()
    for _ in range(args.iterations):
        images, labels = next(batches)
        loss = F.cross_entropy(model(images), labels, ignore_index=cfg.data.ignore_index)
        if not args.softmax:
            ppc, ppd = head.loss(labels)  # ProtoSeg: 3 of 3
            loss = loss + 0.01 * ppc + 0.001 * ppd
        update(loss)
    model.eval()
    miou = val_miou(cfg, val_loader, model)
    return report("smp Unet", args, miou)


if __name__ == "__main__":
    main(sys.argv[1:])
