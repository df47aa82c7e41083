"""torchvision's DeepLabV3 (MobileNetV3-Large, no pretrained weights) trained on DigitScenes
with ProtoSeg's prototype classifier in place of its last 1x1 conv (or, with --softmax, its own).

    python examples/torchvision_deeplabv3.py [--softmax] [--iterations 1500]

The CPU time of the default 1500 iterations, and the val mIoU each head reaches in them, are in
docs/integrations.md (--iterations fits another budget).
"""

from __future__ import annotations

import sys

import torch.nn.functional as F
from common import optimizer_step, report, start, val_miou
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

from protoseg.integrations import prototype_head, replace_classifier


def main(argv=None) -> float:
    args, cfg, batches, val_loader = start(argv, __doc__)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=cfg.data.num_classes)
    if not args.softmax:
        model = replace_classifier(model, num_prototypes=10, proj_dim=64)  # ProtoSeg: 1 of 3 lines
        head = prototype_head(model)  # ProtoSeg: 2 of 3
    update = optimizer_step(model, args)
    model.train()
    for _ in range(args.iterations):
        images, labels = next(batches)
        loss = F.cross_entropy(model(images)["out"], labels, ignore_index=cfg.data.ignore_index)
        if not args.softmax:
            ppc, ppd = head.loss(labels)  # ProtoSeg: 3 of 3
            loss = loss + 0.01 * ppc + 0.001 * ppd
        update(loss)
    model.eval()
    miou = val_miou(cfg, val_loader, lambda images: model(images)["out"])
    return report("torchvision deeplabv3_mobilenet_v3_large", args, miou)


if __name__ == "__main__":
    main(sys.argv[1:])
