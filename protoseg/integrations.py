"""ProtoSeg's classifier in other libraries' segmentation models: `replace_classifier` finds a
model's final classifier conv and puts a PrototypeHead (protoseg/models/head.py) in its place;
the host's forward, upsampling, loss and metrics then run unchanged. docs/integrations.md shows
the training loop for each library.

Known hosts (each library is imported only when a model of it is given):
- torchvision: FCN and DeepLabV3 (`classifier[4]`). Their `aux_classifier`, a training-only
  deep-supervision head on an earlier stage, stays a softmax conv. LRASPP is refused: it sums two
  classifiers over different features (`low_classifier` + `high_classifier`), and one prototype
  classifier has no single place there.
- transformers: SegformerForSemanticSegmentation and UperNetForSemanticSegmentation
  (`decode_head.classifier`; UperNet's `auxiliary_head` stays softmax). ignore_index defaults to
  the config's.
- segmentation_models_pytorch: any SegmentationModel (`segmentation_head[0]`). Where that conv is
  3x3 (Unet, Unet++, MAnet, PAN, PSPNet), the head's 1x1 projection takes its place: the last
  layer loses its 3x3 neighbourhood (the decoder's own 3x3 convs before it remain).
"""

from __future__ import annotations

from torch import nn

from protoseg.models.head import PrototypeHead


def replace_classifier(model: nn.Module, num_prototypes: int = 10, proj_dim: int | None = None, *,
                       projection: str = "default", ignore_index: int | None = None, **prototype_kwargs) -> nn.Module:
    """Put a PrototypeHead in place of `model`'s final classifier conv, in place; returns the model.

    The head keeps the conv's input channels and class count and takes its device, dtype and
    training mode. proj_dim: the embedding channels D (None: the conv's input channels);
    projection, num_prototypes and **prototype_kwargs: PrototypeHead's. ignore_index: the label
    that takes no part (None: the host's, 255 where it has none). Get the head back with
    :func:`prototype_head` to call its ``loss``."""
    conv, install, host_ignore = _classifier_slot(model)
    head = PrototypeHead(conv.in_channels, conv.out_channels, num_prototypes, proj_dim=proj_dim,
                         projection=projection, ignore_index=host_ignore if ignore_index is None else ignore_index,
                         **prototype_kwargs)
    head.to(device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)
    install(head)
    return model


def prototype_head(model: nn.Module) -> PrototypeHead:
    """The one PrototypeHead inside `model`."""
    heads = [m for m in model.modules() if isinstance(m, PrototypeHead)]
    if len(heads) != 1:
        raise ValueError(f"{type(model).__name__} holds {len(heads)} PrototypeHeads (expected one: "
                         f"call replace_classifier once)")
    return heads[0]


def _classifier_slot(model: nn.Module):
    """(the classifier conv, a function that puts a module in its place, the host's ignore_index)."""
    library = type(model).__module__.split(".")[0]
    finders = {"torchvision": _torchvision_slot, "transformers": _transformers_slot,
               "segmentation_models_pytorch": _smp_slot}
    if library not in finders:
        raise TypeError(f"replace_classifier does not know {type(model).__module__}.{type(model).__name__}: "
                        f"it takes torchvision FCN/DeepLabV3, transformers Segformer/UperNet and "
                        f"segmentation_models_pytorch models")
    conv, install, ignore_index = finders[library](model)
    where = f"{type(model).__name__}'s classifier"
    if isinstance(conv, PrototypeHead):
        raise ValueError(f"{where} is already a PrototypeHead")
    if not isinstance(conv, nn.Conv2d) or conv.stride != (1, 1) or conv.groups != 1 or conv.dilation != (1, 1):
        raise TypeError(f"{where} is not the plain Conv2d expected there (got {conv!r})")
    return conv, install, ignore_index


def _torchvision_slot(model: nn.Module):
    from torchvision.models.segmentation import FCN, LRASPP, DeepLabV3

    if isinstance(model, LRASPP):
        raise TypeError("replace_classifier does not take torchvision LRASPP: it sums two classifiers over "
                        "different features (classifier.low_classifier + classifier.high_classifier)")
    if not isinstance(model, (FCN, DeepLabV3)):
        raise TypeError(f"replace_classifier does not know torchvision's {type(model).__name__} "
                        f"(it takes FCN and DeepLabV3)")
    conv = model.classifier[4]
    _expect_kernel(conv, (1,), type(model).__name__)
    return conv, lambda head: model.classifier.__setitem__(4, head), 255


def _transformers_slot(model: nn.Module):
    from transformers import SegformerForSemanticSegmentation, UperNetForSemanticSegmentation

    if isinstance(model, SegformerForSemanticSegmentation):
        ignore_index = model.config.semantic_loss_ignore_index
    elif isinstance(model, UperNetForSemanticSegmentation):
        ignore_index = model.config.loss_ignore_index
    else:
        raise TypeError(f"replace_classifier does not know transformers' {type(model).__name__} "
                        f"(it takes SegformerForSemanticSegmentation and UperNetForSemanticSegmentation)")
    conv = model.decode_head.classifier
    _expect_kernel(conv, (1,), type(model).__name__)
    return conv, lambda head: setattr(model.decode_head, "classifier", head), ignore_index


def _smp_slot(model: nn.Module):
    from segmentation_models_pytorch.base import SegmentationModel

    if not isinstance(model, SegmentationModel):
        raise TypeError(f"replace_classifier does not know segmentation_models_pytorch's {type(model).__name__} "
                        f"(it takes SegmentationModel subclasses)")
    head = model.segmentation_head
    activation = getattr(head[2], "activation", None)
    if not isinstance(activation, nn.Identity):
        raise ValueError(f"{type(model).__name__} has activation {activation!r} after its classifier: build it "
                         f"with activation=None, the prototype head gives logits")
    conv = head[0]
    # 3x3 in Unet, Unet++, MAnet, PAN, PSPNet: replaced all the same (module docstring).
    _expect_kernel(conv, (1, 3), type(model).__name__)
    return conv, lambda new: head.__setitem__(0, new), 255


def _expect_kernel(conv: nn.Module, sizes: tuple[int, ...], host: str) -> None:
    if isinstance(conv, nn.Conv2d) and not (conv.kernel_size[0] == conv.kernel_size[1] in sizes):
        raise TypeError(f"{host}'s classifier conv has kernel {conv.kernel_size} (expected "
                        f"{' or '.join(f'{k}x{k}' for k in sizes)})")
