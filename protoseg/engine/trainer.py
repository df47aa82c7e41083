"""The training loop, plain: build, loop (forward, finite-loss check, backward, step, periodic
evaluation and checkpoint), done. `tools/train.py` is its command line.

Exit statuses (tools/train.py): 0 finished (or stopped at --stop-after), EXIT_NONFINITE when a
loss was not finite, EXIT_INTERRUPTED after SIGTERM/SIGINT (a checkpoint was saved: resume).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from protoseg.config import Config, config_to_dict, save_config
from protoseg.data.datasets import class_names
from protoseg.data.loader import build_train_loader, build_val_loader, prepare_data
from protoseg.engine import checkpoint as ckpt
from protoseg.engine.distributed import (barrier, broadcast_batchnorm_buffers, check_replicas_identical,
                                         init_distributed, is_distributed)
from protoseg.engine.evaluator import SegEvaluator, format_table, save_results
from protoseg.engine.inference import autocast, evaluate_model
from protoseg.models.backbones import count_parameters
from protoseg.models.segmentor import backbone_parameters, build_model, compute_loss

EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again, i.e. run again with --resume


class NonFiniteLoss(RuntimeError):
    pass


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    t = cfg.train
    backbone, rest = backbone_parameters(model)
    groups = [{"params": backbone, "lr": t.lr * t.backbone_lr_mult}, {"params": rest, "lr": t.lr}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    raise ValueError(f"train.optimizer must be sgd or adamw (got {t.optimizer!r})")


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
    rank, world, device = init_distributed()
    main = rank == 0
    t, d = cfg.train, cfg.data
    run_dir = cfg.run_dir
    if not resume and ckpt.list_checkpoints(run_dir):
        raise FileExistsError(f"{run_dir} already holds checkpoints of a run: continue it with --resume, "
                              f"or set output_dir (or remove the folder) to start afresh")
    if main:
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

    start_iter, state = 0, None
    if resume:
        if resume == "auto":
            state, path = ckpt.load_latest(run_dir, log=log if main else lambda _: None)
        else:
            state, path = ckpt.load_checkpoint(resume), resume
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start_iter = state["iteration"]
            if main:
                log(f"resumed from {path} at iteration {start_iter}")
        elif main:
            log(f"no checkpoint in {run_dir}: starting from scratch")
    if start_iter >= t.iterations:
        if main:
            log(f"nothing to do: already at iteration {start_iter} of {t.iterations}")
        return "finished"

    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    # Stop requests are honoured at the next step boundary (loader workers ignore them).
    stop = {"signal": 0}
    handlers = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    writer = jsonl = None
    try:
        loader = build_train_loader(cfg, rank, world, start_iter)
        batches = iter(loader)
        val_loader = build_val_loader(cfg, rank, world)
        evaluator = SegEvaluator(d.num_classes, class_names(d.dataset, d.num_classes), d.ignore_index)
        if state is not None and len(state["rng"]) == world:
            ckpt.set_rng_state(state["rng"][rank])
        else:  # dropout etc. differ per rank
            seed_everything(t.seed + rank)
        state = None

        if main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_iter)
            jsonl = open(os.path.join(run_dir, "log.jsonl"), "a")
            log(f"{cfg.name}: {count_parameters(model) / 1e6:.2f}M parameters, {world} rank(s) on {device}, "
                f"iterations {start_iter} -> {t.iterations}, batch {t.batch_size}")

        def write_log(record: dict) -> None:
            jsonl.write(json.dumps(record) + "\n")
            jsonl.flush()

        def save(iteration: int) -> None:
            if not sync_bn:
                broadcast_batchnorm_buffers(model)
            check_replicas_identical(model)
            rng = [ckpt.rng_state()]
            if is_distributed():
                rng = [None] * world
                dist.all_gather_object(rng, ckpt.rng_state())
            if main:
                path = ckpt.save_checkpoint({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "iteration": iteration, "rng": rng, "config": config_to_dict(cfg),
                }, run_dir, iteration, keep=t.keep_checkpoints)
                # check_replicas_identical raised otherwise
                write_log({"iter": iteration, "checkpoint": path, "replicas_identical": world})

        def run_eval(iteration: int) -> None:
            if not sync_bn:
                broadcast_batchnorm_buffers(model)
            results = evaluate_model(model, val_loader, evaluator, device, t.amp)
            if main:
                log(f"\nevaluation at iteration {iteration}\n{format_table(results)}")
                save_results(results, os.path.join(run_dir, "eval_results.json"))
                write_log({"iter": iteration, "eval": results})
                for key in ("mIoU", "mAcc", "aAcc"):
                    writer.add_scalar(f"val/{key}", results[key], iteration)

        from tqdm import tqdm

        progress = tqdm(total=t.iterations, initial=start_iter, disable=not main, dynamic_ncols=True)
        model.train()
        flags = torch.zeros(2, device=device)
        started, skipped = time.time(), 0
        for it in range(start_iter, t.iterations):
            batch = next(batches)
            while "images" not in batch:  # every sample of the batch was bad (on_error=skip)
                skipped += batch["skipped"]
                batch = next(batches)
            skipped += batch["skipped"]
            images = batch["images"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)

            with autocast(device, t.amp):
                out = net(images, labels)
            loss, terms = compute_loss(out, labels, ignore_index=d.ignore_index, class_weights=class_weights,
                                       ppc_weight=t.ppc_weight, ppd_weight=t.ppd_weight)
            # Every rank learns whether any rank saw a non-finite loss or a stop request, so
            # they all stop at the same step.
            flags[0] = float(not torch.isfinite(loss.detach()))
            flags[1] = float(stop["signal"] != 0)
            if is_distributed():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                values = ", ".join(f"{k}={float(v):.6g}" for k, v in terms.items())
                raise NonFiniteLoss(f"non-finite loss at iteration {it + 1}: "
                                    f"loss={float(loss.detach()):.6g} ({values}); "
                                    f"rank {rank}; the last checkpoint is untouched")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration = it + 1
            progress.update(1)

            if main and (iteration % t.log_interval == 0 or iteration == t.iterations):
                record = {"iter": iteration, "lr": optimizer.param_groups[1]["lr"],
                          "loss": float(loss.detach()),
                          **{k: float(v) for k, v in terms.items()}, "skipped": skipped,
                          "time": round(time.time() - started, 2)}
                write_log(record)
                for key in ("loss", "lr", *terms):
                    writer.add_scalar(f"train/{key}", record[key], iteration)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            last = iteration == t.iterations
            if iteration % t.eval_interval == 0 or last:
                run_eval(iteration)
            interrupted = bool(flags[1])
            stopping = interrupted or iteration == stop_after
            if iteration % t.checkpoint_interval == 0 or last or stopping:
                save(iteration)
            if stopping:
                if main:
                    why = f"signal {stop['signal']}" if interrupted else "--stop-after"
                    log(f"\nstopped at iteration {iteration} ({why}); continue with --resume")
                return "interrupted" if interrupted else "stopped"
        progress.close()
        if main:
            log(f"finished {t.iterations} iterations in {time.time() - started:.0f} s"
                + (f"; {skipped} bad samples skipped" if skipped else ""))
        return "finished"
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if main and jsonl is not None:
            jsonl.close()
            writer.close()
