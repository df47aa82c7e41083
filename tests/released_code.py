"""The released code that protoseg's networks must equal, imported from checkouts as a user
reading it would; its models run unmodified, only what needs more of their frameworks is
replaced by stand-ins:

- the released ProtoSeg (github.com/tfzhou/ProtoSeg, PROTOSEG_RELEASED_SRC: the folder holding
  lib/): openseg's logger and backbone selector (which imports every backbone openseg has);
  needs `einops` and `yacs`, which it imports;
- SegFormer's Mix Transformer (github.com/NVlabs/SegFormer, PROTOSEG_SEGFORMER_SRC: the folder
  holding mmseg/): mmseg's backbone registry and logger, mmcv's checkpoint loader.

Used by the whole-model equivalence tests (tests/test_released.py) and by
tests/fixtures/make_released_keys.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

RELEASED_SRC = os.environ.get("PROTOSEG_RELEASED_SRC", "")
SEGFORMER_SRC = os.environ.get("PROTOSEG_SEGFORMER_SRC", "")


class Configer:
    """openseg's configer: get(section, key) over nested dicts."""

    def __init__(self, num_classes: int, num_prototypes: int = 10):
        self.values = {
            ("data", "num_classes"): num_classes,
            ("network", "backbone"): "hrnet48",
            ("network", "bn_type"): "torchsyncbn",  # the released Cityscapes configs' value
            ("network", "resume"): "no ImageNet weights: random initialisation",
            ("network", "pretrained"): None,
            ("protoseg", "gamma"): 0.999,
            ("protoseg", "num_prototype"): num_prototypes,
            ("protoseg", "use_prototype"): True,
            ("protoseg", "update_prototype"): True,
            ("protoseg", "pretrain_prototype"): False,
        }

    def get(self, *key):
        return self.values[key]


def _stub_openseg() -> None:
    """Replace openseg's logger and backbone selector (the only imports that need more of openseg)."""
    class Log:
        info = warn = warning = debug = staticmethod(lambda *args, **kwargs: None)

        @staticmethod
        def error(message, *args, **kwargs):
            raise RuntimeError(message)

    logger = types.ModuleType("lib.utils.tools.logger")
    logger.Logger = Log
    sys.modules["lib.utils.tools.logger"] = logger

    class BackboneSelector:
        def __init__(self, configer):
            self.configer = configer

        def get_backbone(self):
            from lib.models.backbones.hrnet.hrnet_backbone import HRNetBackbone

            return HRNetBackbone(self.configer)()

    selector = types.ModuleType("lib.models.backbones.backbone_selector")
    selector.BackboneSelector = BackboneSelector
    sys.modules["lib.models.backbones.backbone_selector"] = selector


def released_hrnet():
    """The released lib/models/nets/hrnet.py module (HRNet_W48_Proto, HRNet_W48, ...)."""
    if not os.path.isdir(os.path.join(RELEASED_SRC, "lib", "models", "nets")):
        raise FileNotFoundError(f"PROTOSEG_RELEASED_SRC={RELEASED_SRC!r} is not a checkout of tfzhou/ProtoSeg "
                                f"(no lib/models/nets)")
    if RELEASED_SRC not in sys.path:
        sys.path.insert(0, RELEASED_SRC)
    _stub_openseg()
    return importlib.import_module("lib.models.nets.hrnet")


def build_released(architecture: str, num_classes: int = 19, num_prototypes: int = 10):
    """The released model `architecture` ("HRNet_W48_Proto" or "HRNet_W48") with its own random
    initialisation, in training mode."""
    return getattr(released_hrnet(), architecture)(Configer(num_classes, num_prototypes))


def segformer_mix_transformer():
    """NVlabs/SegFormer's mmseg/models/backbones/mix_transformer.py as a module (mit_b0..mit_b5)."""
    path = os.path.join(SEGFORMER_SRC, "mmseg", "models", "backbones", "mix_transformer.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PROTOSEG_SEGFORMER_SRC={SEGFORMER_SRC!r} is not a checkout of NVlabs/SegFormer "
                                f"(no {path})")
    registry = types.SimpleNamespace(register_module=lambda: (lambda cls: cls))
    stubs = {"mmseg": {}, "mmseg.models": {}, "mmseg.models.builder": {"BACKBONES": registry},
             "mmseg.utils": {"get_root_logger": lambda: None}, "mmcv": {},
             "mmcv.runner": {"load_checkpoint": lambda *args, **kwargs: None}}
    for name, attributes in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules.setdefault(name, module)
    spec = importlib.util.spec_from_file_location("segformer_mix_transformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
