"""Data loaders: a resumable, rank-sharded training sampler and the evaluation loader."""

from __future__ import annotations

import signal

import cv2
import torch
from torch.utils.data import DataLoader, Sampler

from protoseg.config import Config
from protoseg.data import digitscenes
from protoseg.data.datasets import (ImageDataset, SegmentationDataset, check_label_values, dataset_images,
                                    dataset_pairs, folder_pairs, list_images)
from protoseg.data.transforms import EvalTransform, TrainTransform, normalization


class TrainSampler(Sampler):
    """Endless stream of (index, epoch) for one rank, starting at iteration `start_iter`.

    Epoch e is a permutation seeded by (seed, e), cut into global batches of `batch_size`
    (the incomplete last batch is dropped); rank r takes the r-th slice of each global batch.
    Iteration t therefore sees the same samples whatever happened before it, which is what
    makes --resume exact.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world_size: int,
                 start_iter: int = 0):
        if batch_size % world_size:
            raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the number of "
                             f"ranks ({world_size})")
        if size < batch_size:
            raise ValueError(f"the training set has {size} samples, fewer than one batch ({batch_size})")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start_iter = rank, world_size, start_iter

    def __iter__(self):
        per_epoch = self.size // self.batch_size
        per_rank = self.batch_size // self.world_size
        it = self.start_iter
        while True:
            epoch, step = divmod(it, per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g)
            for j in range(step, per_epoch):
                start = j * self.batch_size + self.rank * per_rank
                for index in order[start:start + per_rank].tolist():
                    yield index, epoch
            it = (epoch + 1) * per_epoch


def _worker_init(worker_id: int) -> None:
    # SIGTERM/SIGINT are for the main process, which stops at a step boundary; a worker killed
    # by a signal sent to the whole process group would abort the run instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One OpenCV thread per worker, as DataLoader already sets torch's: the workers are the
    # parallelism. OpenCV's default is a pool of one thread per core in every worker (resize and
    # cvtColor use it), num_workers x cores threads contending with the training process.
    # 0, not 1: 1 stops the pool's threads, and where this process forked from one whose pool
    # had started, it waits forever to join threads it does not have (OpenCV's pthreads
    # backend); 0 runs everything serially without touching the pool.
    cv2.setNumThreads(0)


def collate(items):
    """Stack the good samples, (image, label, index) or (image, index); `skipped` counts those
    the data set dropped (on_error=skip)."""
    good = [item for item in items if item is not None]
    batch = {"skipped": len(items) - len(good)}
    if good:
        batch["images"] = torch.stack([g[0] for g in good])
        if len(good[0]) == 3:
            batch["labels"] = torch.stack([g[1] for g in good])
        batch["indices"] = torch.tensor([g[-1] for g in good])
    return batch


def prepare_data(cfg: Config) -> None:
    """Generate DigitScenes when the config uses it (call on one rank, then barrier)."""
    d = cfg.data
    if d.dataset == "digitscenes":
        if digitscenes.ensure_digitscenes(d.root, d.scenes_train, d.scenes_val, d.scene_size,
                                          unknown_digits=d.unknown_digits, unknown_index=d.unknown_index):
            print(f"generated DigitScenes under {d.root}")


def build_train_loader(cfg: Config, rank: int, world_size: int, start_iter: int) -> DataLoader:
    d = cfg.data
    check_label_values(d.dataset, d.num_classes, d.ignore_index, d.unknown_classes)
    transform = TrainTransform(tuple(d.crop_size), tuple(d.scale_range), d.flip, d.photometric,
                               ignore_index=d.ignore_index, **normalization(cfg))
    dataset = SegmentationDataset(dataset_pairs(d.dataset, d.root, d.train_split), d.num_classes,
                                  transform, ignore_index=d.ignore_index,
                                  reduce_zero_label=d.dataset == "ade20k", on_error=d.on_error,
                                  seed=cfg.train.seed, held_out=tuple(d.unknown_classes),
                                  held_out_as=d.ignore_index)
    sampler = TrainSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, rank, world_size, start_iter)
    # A private generator: creating the loader's iterator must not draw from the global RNG,
    # whose state the checkpoint restores.
    return DataLoader(dataset, batch_size=cfg.train.batch_size // world_size, sampler=sampler,
                      num_workers=d.num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(cfg.train.seed))


def build_val_loader(cfg: Config, rank: int, world_size: int) -> DataLoader:
    """Whole images of the val split (or of data.val_images/val_labels), sharded over ranks."""
    d = cfg.data
    check_label_values(d.dataset, d.num_classes, d.ignore_index, d.unknown_classes)
    if bool(d.val_images) != bool(d.val_labels):
        raise ValueError("set both data.val_images and data.val_labels, or neither")
    if d.val_images:
        pairs = folder_pairs(d.val_images, d.val_labels)
    else:
        pairs = dataset_pairs(d.dataset, d.root, d.val_split)
    dataset = SegmentationDataset(pairs, d.num_classes, EvalTransform(**normalization(cfg)),
                                  ignore_index=d.ignore_index, reduce_zero_label=d.dataset == "ade20k",
                                  on_error=d.on_error, unknown_index=d.unknown_index,
                                  held_out=tuple(d.unknown_classes), held_out_as=d.unknown_index)
    shard = list(range(rank, len(dataset), world_size))  # no padding: each image counted once
    return DataLoader(dataset, batch_size=d.eval_batch_size, sampler=shard, num_workers=d.num_workers,
                      collate_fn=collate, worker_init_fn=_worker_init)


def build_image_loader(cfg: Config, rank: int, world_size: int) -> DataLoader:
    """The images alone of the val split (or of data.val_images), sharded over ranks, for
    writing predictions of a split that has no labels (Cityscapes test)."""
    d = cfg.data
    paths = list_images(d.val_images) if d.val_images else dataset_images(d.dataset, d.root, d.val_split)
    dataset = ImageDataset(paths, EvalTransform(**normalization(cfg)), on_error=d.on_error)
    shard = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=d.eval_batch_size, sampler=shard, num_workers=d.num_workers,
                      collate_fn=collate, worker_init_fn=_worker_init)
