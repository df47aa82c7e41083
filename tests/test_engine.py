import math
import os
import signal

import pytest
import torch
from conftest import BF16_CHANNELS_LAST, COMPILED

from protoseg.config import ConfigError, config_to_dict, load_config
from protoseg.engine import checkpoint as ckpt
from protoseg.engine import trainer as trainer_module
from protoseg.engine.distributed import check_replicas_identical, state_fingerprints
from protoseg.engine.evaluator import SegEvaluator, confusion_matrix, metrics_from_confusion
from protoseg.engine.predict import resolve_amp
from protoseg.engine.trainer import NonFiniteLoss, build_forward, train
from protoseg.models.backbones import WeightsError
from protoseg.models.segmentor import build_model


# ---------------------------------------------------------------- evaluator

def test_confusion_matrix_and_metrics_match_a_hand_computation():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, label, num_classes=4)
    # rows = truth, columns = prediction; the ignore pixel (255) is left out
    assert cm.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    r = metrics_from_confusion(cm, ["a", "b", "c", "d"])
    iou = {"a": 1 / 4, "b": 2 / 4, "c": 1 / 2}  # tp / (gt + pred - tp)
    for name, value in iou.items():
        assert r["IoU"][name] == pytest.approx(value)
    assert math.isnan(r["IoU"]["d"])  # in neither truth nor prediction: left out of the mean
    assert r["mIoU"] == pytest.approx(sum(iou.values()) / 3)
    assert r["mAcc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert r["aAcc"] == pytest.approx(4 / 7)
    evaluator = SegEvaluator(4, ["a", "b", "c", "d"])
    evaluator.process(pred[:1], label[:1])
    evaluator.process(pred[1:], label[1:])
    assert evaluator.cm.tolist() == cm.tolist()


def test_confusion_matrix_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"\[7\]"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), num_classes=4)


# ---------------------------------------------------------------- config

def test_config_base_overrides_and_errors(tmp_path):
    (tmp_path / "base.yaml").write_text("name: b\nmodel:\n  proj_dim: 32\ntrain:\n  lr: 0.1\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: c\ntrain:\n  iterations: 7\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["train.lr=2", "data.crop_size=[8,16]"])
    assert (cfg.name, cfg.model.proj_dim, cfg.train.iterations) == ("c", 32, 7)
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float) and cfg.data.crop_size == [8, 16]
    (tmp_path / "typo.yaml").write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key\(s\) train.lrr"):
        load_config(str(tmp_path / "typo.yaml"))
    with pytest.raises(ConfigError, match="train.iterations must be int"):
        load_config(str(tmp_path / "child.yaml"), ["train.iterations=1.5"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(str(tmp_path / "child.yaml"), ["model.nope=1"])
    cfg = load_config(str(tmp_path / "child.yaml"), ["test.mode=slide", "test.scales=[1, 1.5]", "test.flip=true"])
    assert (cfg.test.mode, cfg.test.scales, cfg.test.flip) == ("slide", [1.0, 1.5], True)
    assert load_config(str(tmp_path / "child.yaml")).test.scales == [1.0]  # default: one whole-image pass
    with pytest.raises(ConfigError, match="test.flip must be bool"):
        load_config(str(tmp_path / "child.yaml"), ["test.flip=3"])
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\ntest:\n  flip: true\n")
    grandchild = load_config(str(tmp_path / "grandchild.yaml"))
    assert grandchild.test.flip and grandchild.test.scales == [1.0]  # its own value over the chain's
    child = load_config(str(tmp_path / "child.yaml"))
    assert config_to_dict(grandchild)["train"] == config_to_dict(child)["train"]
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="comes back to itself"):
        load_config(str(tmp_path / "a.yaml"))


def test_a_stored_config_takes_overrides_and_defaults_missing_sections():
    from protoseg.config import Config, config_from_dict, config_to_dict

    stored = config_to_dict(Config())
    del stored["test"]  # a checkpoint written before the test: section existed
    cfg = config_from_dict(stored, "ckpt.pth", ["test.flip=true", "data.num_classes=3"])
    assert cfg.test.flip and cfg.data.num_classes == 3 and cfg.test.mode == "whole"
    with pytest.raises(ConfigError, match=r"override .test.flips=true.: unknown key\(s\) test.flips"):
        config_from_dict(stored, "ckpt.pth", ["test.flips=true"])


def test_every_shipped_config_loads():
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    names = sorted(n for n in os.listdir(root) if n.endswith(".yaml"))
    assert "digitscenes_protoseg.yaml" in names
    for name in names:
        load_config(os.path.join(root, name))


# ---------------------------------------------------------------- checkpoints

def test_atomic_save_and_fallback_past_a_truncated_checkpoint(tmp_path):
    for it in (1, 2, 3):
        ckpt.save_checkpoint({"model": {"w": torch.full((4,), float(it))}, "iteration": it}, str(tmp_path), it, keep=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["iter_0000003.pth",
                                                                                   "iter_0000002.pth"]
    assert os.readlink(tmp_path / "checkpoint_last.pth") == "iter_0000003.pth"
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]
    newest = tmp_path / "iter_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    messages = []
    state, path = ckpt.load_latest(str(tmp_path), log=messages.append)
    assert state["iteration"] == 2 and path.endswith("iter_0000002.pth")
    assert "iter_0000003.pth is unreadable" in messages[0] and "falling back" in messages[0]


def test_fingerprint_sees_a_single_bit():
    model = torch.nn.Linear(3, 2)
    _, before = state_fingerprints(model)
    with torch.no_grad():
        model.weight.view(-1)[4] = torch.nextafter(model.weight.view(-1)[4], torch.tensor(1.0))
    _, after = state_fingerprints(model)
    assert (before != after).tolist() == [True, False]


def _replica_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        results = [str(check_replicas_identical(model))]
        if rank == 1:  # one bit of one buffer on rank 1
            with torch.no_grad():
                model[1].running_var[2] = torch.nextafter(model[1].running_var[2], torch.tensor(2.0))
        try:
            results.append(str(check_replicas_identical(model)))
        except RuntimeError as e:
            results.append(str(e))
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_replica_check_counts_matching_ranks_and_names_a_differing_tensor(tmp_path):
    torch.multiprocessing.spawn(_replica_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        identical, perturbed = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert identical == "2"
        assert "hold different 1.running_var (and 0 other tensors)" in perturbed, perturbed
    assert check_replicas_identical(torch.nn.Linear(2, 2)) == 1  # one process: itself


# ---------------------------------------------------------------- training

def _load(run_dir, name):
    return torch.load(os.path.join(run_dir, name), weights_only=True)


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], BF16_CHANNELS_LAST, COMPILED], ids=["eager", "bf16-cl", "compiled"])
def test_resume_is_bitwise_exact(tiny_config, tmp_path, progress_bars, overrides):
    path = tiny_config()
    compiled_frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert train(load_config(path, [f"output_dir={tmp_path}/full", *overrides])) == "finished"
    assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > compiled_frames) == (overrides == COMPILED)
    half = [f"output_dir={tmp_path}/half", *overrides]
    assert train(load_config(path, half), stop_after=2) == "stopped"
    assert train(load_config(path, half), resume="auto") == "finished"
    full, resumed = _load(tmp_path / "full", "iter_0000004.pth"), _load(tmp_path / "half", "iter_0000004.pth")
    _assert_states_equal(full["model"], resumed["model"])
    # the keys of the model itself: compiling wraps the step, not the model (no "_orig_mod.")
    assert full["model"].keys() == trainer_module.build_model(load_config(path, overrides)).state_dict().keys()
    assert "classifier.prototypes" in full["model"]
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert len(progress_bars) == 3 and all(bar.closed for bar in progress_bars)
    # and the prototypes did move
    first = _load(tmp_path / "full", "iter_0000002.pth")["model"]["classifier.prototypes"]
    assert not torch.equal(first, full["model"]["classifier.prototypes"])


def test_resume_from_weights_only_starts_at_zero_from_those_weights(tiny_config, tmp_path, progress_bars):
    # what tools/convert_released.py writes: the model and its config, no optimizer state
    cfg = load_config(tiny_config(), [f"output_dir={tmp_path}/converted", "train.iterations=1",
                                      "train.checkpoint_interval=1"])
    source = _model_with_other_weights(cfg)
    path = str(tmp_path / "weights.pth")
    ckpt.atomic_save({"model": source.state_dict(), "config": config_to_dict(cfg), "iteration": 0}, path)
    run = trainer_module.build_run(cfg, path, log=lambda message: None)
    assert run.start_iter == 0 and run.resumed is None and not run.optimizer.state
    _assert_states_equal(run.model.state_dict(), source.state_dict())
    with pytest.raises(WeightsError, match=r"--resume .*weights.pth: no tensor for classifier.weight"):
        trainer_module.build_run(load_config(tiny_config("softmax"), [f"output_dir={tmp_path}/softmax"]), path,
                                 log=lambda message: None)
    ckpt.save_checkpoint({"model": {}, "iteration": 9}, cfg.run_dir, 9)  # a run already there: not mixed in
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        trainer_module.build_run(cfg, path, log=lambda message: None)


def _model_with_other_weights(cfg):
    """A model of `cfg` whose weights differ from the trainer's seeded initialisation."""
    torch.manual_seed(123)
    model = trainer_module.build_model(cfg)
    with torch.no_grad():
        model.classifier.prototypes.copy_(torch.nn.functional.normalize(torch.randn_like(model.classifier.prototypes),
                                                                        dim=-1))
    return model


@pytest.fixture
def progress_bars(monkeypatch):
    """The trainer's tqdm bars, each recording whether it was closed."""
    import tqdm

    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            bars.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    return bars


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], COMPILED], ids=["eager", "compiled"])
def test_non_finite_loss_stops_with_iteration_and_terms(tiny_config, monkeypatch, progress_bars, overrides):
    # The third batch's images are NaN (a compiled step cannot be poisoned from inside: its
    # Python runs once, when it is traced).
    real = trainer_module.build_train_loader

    def poisoned(*args):
        for n, batch in enumerate(real(*args), 1):
            if n == 3:
                batch["images"] = torch.full_like(batch["images"], float("nan"))
            yield batch

    monkeypatch.setattr(trainer_module, "build_train_loader", poisoned)
    cfg = load_config(tiny_config(), overrides)
    with pytest.raises(NonFiniteLoss, match=r"iteration 3: loss=nan \(seg=.*, ppc=.*, ppd=.*\)"):
        train(cfg)
    # the checkpoint of iteration 2 is the newest: nothing was saved after the bad step
    assert os.path.basename(ckpt.list_checkpoints(cfg.run_dir)[0]) == "iter_0000002.pth"
    assert len(progress_bars) == 1 and progress_bars[0].closed


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_boundary(tiny_config, monkeypatch, progress_bars):
    calls = {"n": 0}
    real = trainer_module.compute_loss

    def terminated(out, labels, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(out, labels, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_loss", terminated)
    cfg = load_config(tiny_config(), ["train.checkpoint_interval=100"])
    previous = signal.getsignal(signal.SIGTERM)
    assert train(cfg) == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    assert _load(cfg.run_dir, "checkpoint_last.pth")["iteration"] == 1
    assert len(progress_bars) == 1 and progress_bars[0].closed


def test_optimizers_and_backbone_lr_multiplier():
    from protoseg.config import Config
    from protoseg.engine.trainer import build_optimizer, poly_schedule

    cfg = Config()
    cfg.model.backbone, cfg.model.decoder, cfg.model.classifier = "resnet18", "fcn", "softmax"
    cfg.model.decoder_channels = 8
    cfg.train.lr, cfg.train.backbone_lr_mult, cfg.train.optimizer = 0.1, 0.25, "adamw"
    optimizer = build_optimizer(cfg, build_model(cfg))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == [0.025, 0.1]
    scheduler = poly_schedule(optimizer, total=10, power=1.0)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.05)
    cfg.train.optimizer = "lamb"
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(cfg, build_model(cfg))
    cfg.train.optimizer = "sgd"
    assert build_optimizer(cfg, build_model(cfg)).defaults["fused"]  # the default implementation
    cfg.train.optimizer_impl = "foreach"
    assert build_optimizer(cfg, build_model(cfg)).defaults["foreach"]
    cfg.train.optimizer_impl = "apex"
    with pytest.raises(ValueError, match="train.optimizer_impl must be one of fused, foreach, loop .got 'apex'"):
        build_optimizer(cfg, build_model(cfg))


@pytest.mark.parametrize("override, message", [
    ("train.optimizer_impl=apex", "train.optimizer_impl must be one of fused, foreach, loop .got 'apex'"),
    ("train.amp=fp8", "train.amp must be one of none, bf16, fp16, auto .got 'fp8'"),
])
def test_a_trainer_option_outside_its_choices_is_refused_when_the_config_is_read(tiny_config, override, message):
    # not at the first step, after the run folder and the data were made: tools/train.py prints a
    # ConfigError as one line
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config(), [override])


@pytest.mark.slow
def test_bf16_autocast_trains(tiny_config, monkeypatch):
    # The backbone's convolutions run in bf16 during the training steps (recorded by a hook on
    # every model the trainer builds), and the weights stay finite.
    dtypes = []
    build = trainer_module.build_model

    def recording_build(cfg):
        model = build(cfg)
        model.backbone.body.conv1.register_forward_hook(lambda m, i, out: dtypes.append((m.training, out.dtype)))
        return model

    monkeypatch.setattr(trainer_module, "build_model", recording_build)
    cfg = load_config(tiny_config(), ["train.amp=bf16", "train.iterations=2", "train.eval_interval=2"])
    assert train(cfg) == "finished"
    assert [dtype for training, dtype in dtypes if training] == [torch.bfloat16] * 2
    state = torch.load(os.path.join(cfg.run_dir, "checkpoint_last.pth"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("native", [True, False], ids=["bf16-native", "bf16-emulated"])
def test_amp_auto_trains_in_bf16_only_where_the_cpu_computes_it_natively(tiny_config, monkeypatch, native):
    # Emulated bf16 is several times slower than float32 (docs/performance.md#on-a-cpu-without-native-bf16),
    # so auto must fall back to float32 there; explicit values are kept whatever the CPU.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    resolved = [resolve_amp(amp, cpu) for amp in ("auto", "bf16", "none")]
    assert resolved == ["bf16" if native else "none", "bf16", "none"]
    cfg = load_config(tiny_config(), ["train.amp=auto"])
    model = build_model(cfg).train()
    dtypes = []
    model.backbone.body.conv1.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, cfg.data.num_classes, (2, 32, 32))
    build_forward(model, cfg, cpu)(images, labels)
    assert dtypes == [torch.bfloat16 if native else torch.float32]


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tiny_config, tmp_path):
    cfg = load_config(tiny_config())
    os.makedirs(cfg.run_dir)
    ckpt.save_checkpoint({"model": {}, "iteration": 9}, cfg.run_dir, 9)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
