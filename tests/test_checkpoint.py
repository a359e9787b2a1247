"""Checkpoint files: durable saves, the kinds they name."""
import os

import torch

import checkpoint
from dit import DiT
from dit_cfg import ConditionalDiT


def test_a_save_reaches_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """The file's bytes are fsynced before it replaces the old checkpoint, and the folder
    (which holds the rename) after; otherwise a power loss can leave a truncated or stale file."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, os.path.getsize(path) if os.path.isfile(path) else None))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst), None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint({"weights": torch.arange(1000.0)}, str(path))

    kinds = [kind for kind, _, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    _, synced_file, size = events[0]
    assert synced_file.startswith(str(path) + ".tmp") and size == os.path.getsize(path)  # the whole file
    assert events[2][1] == str(tmp_path)  # the folder
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(1000.0))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left


def test_checkpoints_that_name_the_kind_by_its_module_load_as_that_model(tmp_path):
    for module_name, model_class in (("dit", DiT), ("dit_cfg", ConditionalDiT)):
        model = model_class(img_size=8, patch_size=4, dim=16, depth=1, heads=2)
        path = str(tmp_path / f"{module_name}.pt")
        checkpoint.save_checkpoint({"kind": module_name, "model_config": dict(model.config),
                                    "scheduler_config": {"timesteps": 1000}, "ema": model.state_dict()}, path)
        loaded, _, ckpt = checkpoint.load_model(path, expected_kind=model_class.kind)
        assert type(loaded) is model_class and ckpt["kind"] == model_class.kind


def test_sampling_loads_the_ema_weights_and_no_ema_the_raw_ones(tmp_path):
    """A checkpoint with distinct raw and EMA weights (the EMA all ones, the raw all twos):
    load_model gives the EMA by default and the raw weights with use_ema=False (--no_ema)."""
    model = DiT(img_size=8, patch_size=4, dim=16, depth=1, heads=2)
    ema = {name: torch.ones_like(tensor) for name, tensor in model.state_dict().items()}
    raw = {name: torch.full_like(tensor, 2.0) for name, tensor in model.state_dict().items()}
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint({"kind": DiT.kind, "model_config": dict(model.config),
                                "scheduler_config": {"timesteps": 1000}, "ema": ema, "model": raw}, path)
    for use_ema, value in ((True, 1.0), (False, 2.0)):
        loaded, _, _ = checkpoint.load_model(path, use_ema=use_ema)
        assert all((tensor == value).all() for tensor in loaded.state_dict().values()), use_ema
