"""Atomic checkpoints and resumption with fallback past a damaged newest file.

Files in the run folder: iter_<iteration:07d>.pth (the last `keep` are kept) and
checkpoint_last.pth, a symbolic link to the newest.
"""

from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch

from protoseg.config import Config, ConfigError, config_from_dict, load_config

_NAME = re.compile(r"iter_(\d+)\.pth$")


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_tensors(state):
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(s):
    return s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename over `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str, write) -> None:
    """Call write(binary file) on a temporary file in the folder of `path`, fsync, rename it
    over `path`: readers see the old file or the whole new one, never a part."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, run_dir: str, iteration: int, keep: int = 3) -> str:
    path = os.path.join(run_dir, f"iter_{iteration:07d}.pth")
    atomic_save(state, path)
    link = os.path.join(run_dir, "checkpoint_last.pth")
    tmp_link = link + ".tmp"
    if os.path.lexists(tmp_link):
        os.remove(tmp_link)
    os.symlink(os.path.basename(path), tmp_link)
    os.replace(tmp_link, link)
    for old in list_checkpoints(run_dir)[keep:]:
        os.remove(old)
    return path


def list_checkpoints(run_dir: str) -> list[str]:
    """iter_*.pth in `run_dir`, newest first."""
    paths = [p for p in glob.glob(os.path.join(run_dir, "iter_*.pth")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)), reverse=True)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint file (tensors and plain data only: weights_only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise RuntimeError(f"{path} is not a protoseg checkpoint (no 'model' entry)")
    return state


def load_run(checkpoint: str, config: str = "", overrides=()) -> tuple[dict, Config]:
    """(checkpoint state, config) for a tool: the config file `config` if given, else the one
    the checkpoint stores, with `overrides` on top. Raises ValueError with one line to print:
    the checkpoint cannot be read, or ConfigError for a bad config or one the checkpoint lacks."""
    try:
        state = load_checkpoint(checkpoint)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"cannot load checkpoint {checkpoint}: {str(e).splitlines()[0]}") from None
    if config:
        return state, load_config(config, overrides)
    if not isinstance(state.get("config"), dict):
        raise ConfigError(f"{checkpoint} holds no config: give the config file before it")
    return state, config_from_dict(state["config"], checkpoint, overrides)


def load_latest(run_dir: str, log=print) -> tuple[dict, str] | tuple[None, None]:
    """The newest checkpoint in `run_dir` that loads; damaged newer ones are reported and
    skipped. (None, None) when there is none."""
    for path in list_checkpoints(run_dir):
        try:
            return load_checkpoint(path), path
        except Exception as e:  # a truncated or corrupt file: any loader error
            log(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                f"falling back to the previous one")
    return None, None
