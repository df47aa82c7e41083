import os
import sys

import pytest
import torch  # noqa: F401  (loads libtorch before protoseg's extension)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = """\
name: tiny
output_dir: {run}
model:
  backbone: hrnet_w18_small
  decoder_channels: 16
  dropout: 0.1
  classifier: {classifier}
  proj_dim: 16
  num_prototypes: 2
data:
  root: {data}
  crop_size: [32, 32]
  scene_size: 32
  scenes_train: 16
  scenes_val: 4
  eval_batch_size: 4
  num_workers: 0
train:
  iterations: 4
  batch_size: 4
  lr: 0.01
  eval_interval: 4
  checkpoint_interval: 2
  log_interval: 1
"""


# The files that take minutes run first: make test runs the files in two processes
# (pytest-xdist --dist loadfile), which otherwise end with one process running the last long
# file alone. A stable sort: each file's tests keep their order.
LONG_FILES = ("test_tools.py", "test_engine.py", "test_cmake_build.py", "test_emulated.py", "test_compile.py",
              "test_emulated_tsan.py", "test_export.py", "test_visualize.py", "test_camvid.py", "test_released.py")


def pytest_collection_modifyitems(items):
    first = {name: rank for rank, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(LONG_FILES)))


# train.compile on the tiny config: a small ResNet with the FCN head in place of HRNet, whose
# graph compiles in tens of seconds rather than minutes on 2 cores.
COMPILED = ["train.compile=true", "model.backbone=resnet10t", "model.decoder=fcn"]
# the other options of a step (docs/configs.md), away from their defaults
BF16_CHANNELS_LAST = ["train.amp=bf16", "train.channels_last=true", "train.optimizer_impl=foreach"]


@pytest.fixture
def tiny_config(tmp_path):
    """Write a tiny DigitScenes config (32x32 scenes, a narrow head, 4 iterations); returns a
    function (classifier="prototype") -> its path. Runs go to tmp_path/run."""

    def write(classifier: str = "prototype") -> str:
        path = tmp_path / f"tiny_{classifier}.yaml"
        path.write_text(TINY_CONFIG.format(run=tmp_path / "run", data=tmp_path / "data", classifier=classifier))
        return str(path)

    return write


def tool_command(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "tools", name), *args]


@pytest.fixture
def tiny_checkpoint(tiny_config, tmp_path):
    """A function (*overrides) -> path of a checkpoint holding a randomly initialised model of
    the tiny config (with overrides) and that config, as the trainer stores them."""
    from protoseg.config import config_to_dict, load_config
    from protoseg.models.segmentor import build_model

    def write(*overrides: str) -> str:
        cfg = load_config(tiny_config(), list(overrides))
        torch.manual_seed(0)
        model = build_model(cfg)
        path = tmp_path / "tiny_checkpoint.pth"
        torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "iteration": 0}, path)
        return str(path)

    return write
