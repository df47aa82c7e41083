"""The training loop, plain: build_run (model, optimizer, schedule, resumed state), start_loop
(loaders, logs), then per iteration train_step (forward, finite-loss check agreed by all
ranks, backward, step), log_step, and evaluate_and_checkpoint. `tools/train.py` is its
command line.

Exit statuses (tools/train.py): 0 finished (or stopped at --stop-after), EXIT_NONFINITE when a
loss was not finite, EXIT_INTERRUPTED after SIGTERM/SIGINT (a checkpoint was saved: resume).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from protoseg.config import Config, config_to_dict, save_config
from protoseg.data.datasets import class_names
from protoseg.data.loader import build_train_loader, build_val_loader, prepare_data
from protoseg.engine import checkpoint as ckpt
from protoseg.engine.distributed import (barrier, broadcast_batchnorm_buffers, check_replicas_identical,
                                         init_distributed, is_distributed)
from protoseg.engine.evaluator import SegEvaluator, format_table, save_results
from protoseg.engine.predict import autocast, evaluate_model, resolve_amp
from protoseg.engine.prototypes import format_statistics, summary_scalars, usage_statistics, val_usage
from protoseg.models.backbones import check_state_dict, count_parameters
from protoseg.models.segmentor import backbone_parameters, build_model, compute_loss

EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again, i.e. run again with --resume


class NonFiniteLoss(RuntimeError):
    pass


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    t = cfg.train
    backbone, rest = backbone_parameters(model)
    groups = [{"params": backbone, "lr": t.lr * t.backbone_lr_mult}, {"params": rest, "lr": t.lr}]
    impl = OPTIMIZER_IMPLS.get(t.optimizer_impl)
    if impl is None:
        raise ValueError(f"train.optimizer_impl must be one of {', '.join(OPTIMIZER_IMPLS)} (got {t.optimizer_impl!r})")
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **impl)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, **impl)
    raise ValueError(f"train.optimizer must be sgd or adamw (got {t.optimizer!r})")


OPTIMIZER_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def poly_schedule(optimizer, total: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - min(it, total) / total) ** power)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, resume: str = "", stop_after: int = 0, log=print) -> str:
    """Train as `cfg` says. `resume`: "" (fresh), "auto" (the newest readable checkpoint of
    the run folder, fresh if none) or a checkpoint path. `stop_after`: stop (with a
    checkpoint) once this iteration is done, as if interrupted; 0 = run to the end.

    Returns "finished", "stopped" or "interrupted" (SIGTERM/SIGINT); raises NonFiniteLoss."""
    run = build_run(cfg, resume, log)
    total = cfg.train.iterations
    if run.start_iter >= total:
        run.info(f"nothing to do: already at iteration {run.start_iter} of {total}")
        return "finished"
    with StopRequest() as stop:
        try:
            start_loop(run)
            for iteration in range(run.start_iter + 1, total + 1):
                loss, terms, flags = train_step(run, iteration, stop)
                log_step(run, iteration, loss, terms)
                stopping = flags.stop_requested or iteration == stop_after
                evaluate_and_checkpoint(run, iteration, checkpoint_now=stopping)
                if stopping:
                    why = f"signal {stop.signal}" if flags.stop_requested else "--stop-after"
                    run.info(f"\nstopped at iteration {iteration} ({why}); continue with --resume")
                    return "interrupted" if flags.stop_requested else "stopped"
            run.progress.close()
            run.info(f"finished {total} iterations in {time.time() - run.started:.0f} s"
                     + (f"; {run.skipped} bad samples skipped" if run.skipped else ""))
            return "finished"
        finally:
            close_loop(run)


@dataclass
class Run:
    """What a training run holds: build_run fills the first part, start_loop the rest."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # the bare model: what is evaluated and saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    class_weights: torch.Tensor | None
    sync_bn: bool
    start_iter: int
    resumed: dict | None  # the checkpoint resumed from, until start_loop restores its RNG states
    log: Callable[[str], None]
    net: torch.nn.Module | None = None  # the model, or DDP around it
    forward: Callable | None = None  # (images, labels) -> (loss, terms): net and loss, maybe compiled
    batches: Iterator | None = None
    val_loader: DataLoader | None = None
    evaluator: SegEvaluator | None = None
    records: RunRecords | None = None
    progress: object = None  # the tqdm bar
    skipped: int = 0  # bad samples dropped so far (data.on_error=skip)
    started: float = 0.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def info(self, message: str) -> None:
        if self.main:
            self.log(message)


def build_run(cfg: Config, resume: str, log) -> Run:
    """Join the ranks, prepare the run folder and data, build the model, optimizer, schedule
    and grad scaler with the same seed on every rank, and load the checkpoint to resume."""
    rank, world, device = init_distributed()
    t, d = cfg.train, cfg.data
    run_dir = cfg.run_dir
    # An explicit checkpoint holding weights only (tools/convert_released.py) starts a new run.
    state = ckpt.load_checkpoint(resume) if resume not in ("", "auto") else None
    fresh = not resume or (state is not None and "optimizer" not in state)
    if fresh and ckpt.list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints of a run: continue it with --resume, "
                              f"or set output_dir (or remove the folder) to start afresh")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        prepare_data(cfg)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    barrier()

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(t.seed)
    model = build_model(cfg).to(device)
    sync_bn = world > 1 and device.type == "cuda" and cfg.model.sync_bn
    if sync_bn:  # SyncBatchNorm needs GPUs; on CPU ranks rank 0's BN statistics are broadcast instead
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    scheduler = poly_schedule(optimizer, t.iterations, t.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    class_weights = torch.tensor(t.class_weights, device=device) if t.class_weights else None
    if class_weights is not None and len(class_weights) != d.num_classes:
        raise ValueError(f"train.class_weights has {len(class_weights)} values for {d.num_classes} classes")
    run = Run(cfg, rank, world, device, model, optimizer, scheduler, scaler, class_weights, sync_bn,
              start_iter=0, resumed=None, log=log)
    if resume == "auto":
        state, path = ckpt.load_latest(run_dir, log=run.info)
    else:
        path = resume
    if resume and state is None:
        run.info(f"no checkpoint in {run_dir}: starting from scratch")
    elif state is not None:
        # one line naming the first tensor that does not fit this config's model
        check_state_dict(state["model"], model.state_dict(), f"--resume {path}")
        model.load_state_dict(state["model"])
        if "optimizer" not in state:  # weights only (tools/convert_released.py)
            run.info(f"initialised from {path} (weights only: a fresh optimizer and schedule from iteration 0)")
        else:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            run.start_iter, run.resumed = state["iteration"], state
            run.info(f"resumed from {path} at iteration {run.start_iter}")
    return run


def start_loop(run: Run) -> None:
    """DDP, the loaders (the training one resuming at start_iter), the evaluator, each rank's
    RNG state, and on rank 0 the logs and the progress bar."""
    from tqdm import tqdm

    cfg, t, d = run.cfg, run.cfg.train, run.cfg.data
    run.net = run.model
    if run.world > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        run.net = DistributedDataParallel(run.model, device_ids=device_ids, broadcast_buffers=False)
    run.forward = build_forward(run.net, cfg, run.device, run.class_weights, distributed=run.world > 1)
    if t.amp == "auto":
        run.info(f"train.amp=auto: {resolve_amp(t.amp, run.device)} on this {run.device.type}")
    run.batches = iter(build_train_loader(cfg, run.rank, run.world, run.start_iter))
    run.val_loader = build_val_loader(cfg, run.rank, run.world)
    run.evaluator = SegEvaluator(d.num_classes,
                                 class_names(d.dataset, d.num_classes, d.unknown_digits, d.unknown_classes),
                                 d.ignore_index, d.unknown_index)
    if run.resumed is not None and len(run.resumed["rng"]) == run.world:
        ckpt.set_rng_state(run.resumed["rng"][run.rank])
    else:  # dropout etc. differ per rank
        seed_everything(t.seed + run.rank)
    run.resumed = None
    if run.main:
        run.records = RunRecords(cfg.run_dir, run.start_iter)
        backend = f" ({dist.get_backend()})" if is_distributed() else ""
        run.log(f"{cfg.name}: {count_parameters(run.model) / 1e6:.2f}M parameters, {run.world} rank(s) on "
                f"{run.device}{backend}, iterations {run.start_iter} -> {t.iterations}, batch {t.batch_size}")
    run.progress = tqdm(total=t.iterations, initial=run.start_iter, disable=not run.main, dynamic_ncols=True)
    run.model.train()
    run.started = time.time()


def close_loop(run: Run) -> None:
    # The training loader's workers are shut down here, not when the iterator is collected: after
    # an error a traceback cycle keeps it alive past exit, and the workers ignore SIGTERM
    # (loader.py), so multiprocessing's exit handler, which terminates and then joins them,
    # would wait forever. _shutdown_workers is what the iterator's own __del__ calls.
    shutdown = getattr(run.batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    run.batches = None
    if run.progress is not None:
        run.progress.close()
    if run.records is not None:
        run.records.close()


@dataclass
class StopFlags:
    """Why the run stops after this step; the same on every rank (any rank's reason counts)."""

    nonfinite_loss: bool
    stop_requested: bool


def agree_on_stop(loss: torch.Tensor, stop_requested: bool) -> StopFlags:
    """Every rank learns whether any rank saw a non-finite loss or a stop request, so they all
    stop at the same step."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                         torch.tensor(float(stop_requested), device=loss.device)])
    if is_distributed():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return StopFlags(nonfinite_loss=bool(flags[0]), stop_requested=bool(flags[1]))


def build_forward(net: torch.nn.Module, cfg: Config, device: torch.device, class_weights: torch.Tensor | None = None,
                  distributed: bool = False) -> Callable:
    """(images, labels) -> (loss, terms): the network under autocast, and the loss; the part of a
    step that train.compile compiles. Compiled, the model is not wrapped, so its state dict keeps
    its own keys.

    Under DDP (`distributed`) the graph is split at the gradient buckets (dynamo's
    DDPOptimizer), so that all-reduces overlap the backward as in eager: fullgraph only on one
    rank."""
    t = cfg.train
    amp = resolve_amp(t.amp, device)  # outside the compiled function: a CPU feature query

    def forward(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with autocast(device, amp):
            out = net(images, labels)
        return compute_loss(out, labels, ignore_index=cfg.data.ignore_index, class_weights=class_weights,
                            ppc_weight=t.ppc_weight, ppd_weight=t.ppd_weight)

    return torch.compile(forward, fullgraph=not distributed) if t.compile else forward


def train_step(run: Run, iteration: int, stop: StopRequest) -> tuple[torch.Tensor, dict, StopFlags]:
    """One iteration: forward, loss, the agreed stop flags (raises NonFiniteLoss before any
    update if a loss is not finite), backward, optimizer and schedule step."""
    batch = next(run.batches)
    while "images" not in batch:  # every sample of the batch was bad (on_error=skip)
        run.skipped += batch["skipped"]
        batch = next(run.batches)
    run.skipped += batch["skipped"]
    images = batch["images"].to(run.device, non_blocking=True)
    labels = batch["labels"].to(run.device, non_blocking=True)

    loss, terms = run.forward(images, labels)
    flags = agree_on_stop(loss, stop.signal != 0)
    if flags.nonfinite_loss:
        values = ", ".join(f"{k}={float(v):.6g}" for k, v in terms.items())
        raise NonFiniteLoss(f"non-finite loss at iteration {iteration}: "
                            f"loss={float(loss.detach()):.6g} ({values}); "
                            f"rank {run.rank}; the last checkpoint is untouched")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.progress.update(1)
    return loss, terms, flags


def log_step(run: Run, iteration: int, loss: torch.Tensor, terms: dict) -> None:
    t = run.cfg.train
    if not run.main or (iteration % t.log_interval and iteration != t.iterations):
        return
    record = {"iter": iteration, "lr": run.optimizer.param_groups[1]["lr"], "loss": float(loss.detach()),
              **{k: float(v) for k, v in terms.items()}, "skipped": run.skipped,
              "time": round(time.time() - run.started, 2)}
    usage = getattr(run.model.classifier, "usage", None)
    if usage is not None:  # the prototypes on this rank's training batch
        stats = usage_statistics(usage, run.model.classifier.prototypes, run.evaluator.class_names)
        record["prototypes"] = {key: value for key, value in stats.items() if key != "classes"}
        run.records.scalars("train_prototypes", summary_scalars(stats), iteration)
    run.records.write(record)
    run.records.scalars("train", {key: record[key] for key in ("loss", "lr", *terms)}, iteration)
    run.progress.set_postfix(loss=f"{record['loss']:.4f}")


def evaluate_and_checkpoint(run: Run, iteration: int, checkpoint_now: bool = False) -> None:
    """Evaluate every eval_interval iterations and at the end; save a checkpoint every
    checkpoint_interval, at the end, and when `checkpoint_now` (the run is stopping)."""
    t = run.cfg.train
    last = iteration == t.iterations
    if iteration % t.eval_interval == 0 or last:
        evaluate(run, iteration)
    if iteration % t.checkpoint_interval == 0 or last or checkpoint_now:
        save(run, iteration)


def evaluate(run: Run, iteration: int) -> None:
    """The val metrics and, for the prototype classifier, the prototype statistics on the val
    pixels (a second pass over the val images: whole images, one scale, feature resolution)."""
    if not run.sync_bn:
        broadcast_batchnorm_buffers(run.model)
    results = evaluate_model(run.model, run.val_loader, run.evaluator, run.device, run.cfg.test,
                             run.cfg.train.amp)
    prototypes, printed = {}, format_table(results)
    if run.model.uses_prototypes:
        counts = val_usage(run.model, run.val_loader, run.device, run.cfg.train.amp)
        stats = usage_statistics(counts, run.model.classifier.prototypes, run.evaluator.class_names)
        prototypes, printed = {"prototypes": stats}, f"{printed}\n{format_statistics(stats)}"
    if run.main:
        run.log(f"\nevaluation at iteration {iteration}\n{printed}")
        save_results({**results, **prototypes}, os.path.join(run.cfg.run_dir, "eval_results.json"))
        run.records.write({"iter": iteration, "eval": results, **prototypes})
        run.records.scalars("val", {key: results[key] for key in ("mIoU", "mAcc", "aAcc")}, iteration)
        if prototypes:
            run.records.scalars("val_prototypes", summary_scalars(stats), iteration)
            run.records.scalars("val_prototypes_entropy",
                                {name: c["entropy"] for name, c in stats["classes"].items()}, iteration)


def save(run: Run, iteration: int) -> None:
    """Check that every rank holds the same model (raises naming the first tensor that
    differs), then save model, optimizer, schedule, scaler, every rank's RNG state and the
    config atomically."""
    if not run.sync_bn:
        broadcast_batchnorm_buffers(run.model)
    identical = check_replicas_identical(run.model)
    rng = [ckpt.rng_state()]
    if is_distributed():
        rng = [None] * run.world
        dist.all_gather_object(rng, ckpt.rng_state())
    if run.main:
        path = ckpt.save_checkpoint({
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "iteration": iteration, "rng": rng, "config": config_to_dict(run.cfg),
        }, run.cfg.run_dir, iteration, keep=run.cfg.train.keep_checkpoints)
        run.records.write({"iter": iteration, "checkpoint": path, "replicas_identical": identical})


class StopRequest:
    """While active, SIGTERM and SIGINT only set `signal` (honoured at the next step boundary;
    loader workers ignore them); on exit the previous handlers are restored."""

    def __enter__(self) -> StopRequest:
        self.signal = 0
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class RunRecords:
    """Rank 0's log.jsonl (one JSON object per line, appended) and TensorBoard scalars."""

    def __init__(self, run_dir: str, start_iter: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_iter)
        self.jsonl = open(os.path.join(run_dir, "log.jsonl"), "a")

    def write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def scalars(self, prefix: str, values: dict, iteration: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, iteration)

    def close(self) -> None:
        self.jsonl.close()
        self.writer.close()
