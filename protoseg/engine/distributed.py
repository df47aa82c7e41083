"""torch.distributed helpers: set-up from torchrun's environment, and replica checks."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (which sets LOCAL_RANK), or WORLD_SIZE > 1,
    joins the process group: NCCL with one GPU per rank when CUDA is available, gloo on CPU.
    A 1-process torchrun joins too, so it runs the collectives of a multi-process run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and "LOCAL_RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timedelta(minutes=30))
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=30))
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_batchnorm_buffers(model: nn.Module) -> None:
    """Plain BatchNorm (no SyncBatchNorm, e.g. on CPU) keeps per-rank running statistics;
    give every rank rank 0's before evaluating or saving so all replicas are the same model."""
    if not is_distributed():
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    dist.broadcast(buffer, 0)


def state_fingerprints(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names and an exact int64 fingerprint of every parameter and buffer: the raw bits of the
    tensor, weighted by position, summed. Equal tensors give equal fingerprints whatever the
    thread count; changing one bit changes it."""
    names, values = [], []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        data = t.detach().cpu().contiguous().view(-1)
        bits = data.view(torch.int32) if data.element_size() == 4 else data.view(torch.uint8)
        bits = bits.to(torch.int64)
        weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64) % 1_000_003 + 1
        names.append(name)
        values.append(int((bits * weights).sum()))
    return names, torch.tensor(values, dtype=torch.int64)


def check_replicas_identical(model: nn.Module) -> int:
    """Compare every rank's fingerprints of `model` (all-gathered); return how many ranks hold
    exactly this rank's model (1 without torch.distributed). Raise naming the first parameter
    or buffer that differs."""
    if not is_distributed():
        return 1
    names, mine = state_fingerprints(model)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    gathered = [torch.empty_like(mine, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine.to(device))
    matching = 0
    for rank, other in enumerate(gathered):
        diff = (other.cpu() != mine).nonzero()
        if diff.numel():
            raise RuntimeError(f"rank {dist.get_rank()} and rank {rank} hold different "
                               f"{names[int(diff[0])]} (and {diff.numel() - 1} other tensors)")
        matching += 1
    return matching
