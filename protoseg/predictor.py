"""protoseg.Predictor: a trained model from one checkpoint, applied to anyone's images."""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import torch

from protoseg.config import Config, config_from_dict
from protoseg.data.datasets import class_names, read_image
from protoseg.data.transforms import EvalTransform, normalization
from protoseg.engine.anomaly import fit_path, load_fit
from protoseg.engine.checkpoint import load_checkpoint
from protoseg.engine.predict import check_test_config, num_views, predict
from protoseg.models.segmentor import load_trained_model


class Predictor:
    """Segment images with the model, preprocessing and `test:` settings of a checkpoint.

        predictor = Predictor.from_checkpoint("runs/digitscenes_protoseg/checkpoint_last.pth")
        classes = predictor.predict("scene.png")                     # [H, W] int64 class ids
        classes, probs = predictor.predict(rgb, return_probs=True)   # and [K, H, W] float32
        maps = predictor.predict(["a.png", rgb])                     # a list in, a list out
        classes, score = predictor.predict(rgb, return_score=True)   # and [H, W] open-set score
        classes, score = predictor.predict(rgb, return_score="energy")  # a named one

    An image is a path or an [H, W, 3] uint8 RGB array, of any size. It is normalised exactly
    as for evaluation and predicted by protoseg/engine/predict.py; same-sized images of a list
    share forward passes, data.eval_batch_size at a time. `class_names` names the ids.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device, fit: dict | None = None):
        check_test_config(cfg.test)
        self.model, self.cfg, self.device, self.fit = model.eval(), cfg, device, fit
        self.class_names = class_names(cfg.data.dataset, cfg.data.num_classes, cfg.data.unknown_digits,
                                       cfg.data.unknown_classes)
        self.transform = EvalTransform(**normalization(cfg))

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device | None = None,
                        **test_options) -> Predictor:
        """Build the model from the config stored in checkpoint `path` and load its weights.
        `device`: default CUDA when available, else the CPU. `test_options` override the
        stored `test:` section (mode="slide", crop_size=[512, 1024], scales=[...], flip=True).
        The open-set fit beside the checkpoint (tools/fit_open_set.py) is loaded when present."""
        state = load_checkpoint(path)
        if not isinstance(state.get("config"), dict):
            raise ValueError(f"{path} holds no config (not written by protoseg's trainer); build the "
                             f"model from its config file instead")
        data = dict(state["config"])
        data["test"] = {**data.get("test", {}), **test_options}
        cfg = config_from_dict(data, source=f"{path} (with test options {sorted(test_options)})")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_trained_model(cfg, state)
        fit = load_fit(fit_path(path), model) if os.path.exists(fit_path(path)) else None
        return cls(model.to(device), cfg, device, fit)

    def predict(self, image, return_probs: bool = False, return_score: bool | str = False):
        """image: a path, an [H, W, 3] uint8 RGB array, or a list of either. Returns the [H, W]
        int64 class-id map at the input's size (a list of them for a list); with
        `return_probs` and/or `return_score`, a tuple (map, [K, H, W] float32 probabilities,
        [H, W] float32 open-set score) of what was asked, in that order, for each image. The
        score is higher for pixels less like any class seen in training: `return_score` names
        one of protoseg/engine/anomaly.py's SCORES, or True for msp."""
        single = not isinstance(image, (list, tuple))
        arrays = [_as_rgb(item) for item in ([image] if single else image)]
        results: list = [None] * len(arrays)
        by_size = defaultdict(list)
        for i, array in enumerate(arrays):
            by_size[array.shape].append(i)
        step = max(1, self.cfg.data.eval_batch_size)
        names = () if return_score is False else ("msp" if return_score is True else return_score,)
        for indices in by_size.values():
            for start in range(0, len(indices), step):
                chunk = indices[start:start + step]
                batch = torch.stack([self.transform.image(arrays[i]) for i in chunk]).to(self.device)
                result = predict(self.model, batch, self.cfg.test, self.cfg.train.amp, open_set=names,
                                 fit=self.fit)
                scores, open_set = result if return_score else (result, None)
                outputs = [scores.argmax(dim=1).cpu().numpy()]
                if return_probs:
                    probs = scores.softmax(dim=1) if num_views(self.cfg.test) == 1 else scores
                    outputs.append(probs.cpu().numpy())
                if return_score:
                    outputs.append(open_set[:, 0].cpu().numpy())
                for j, i in enumerate(chunk):
                    results[i] = tuple(o[j] for o in outputs) if len(outputs) > 1 else outputs[0][j]
        return results[0] if single else results


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a path or an [H, W, 3] uint8 RGB numpy array "
                        f"(got {type(image).__name__})")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must be an [H, W, 3] uint8 RGB array "
                         f"(got {image.dtype} {list(image.shape)})")
    return image
