"""Checkpoint files: durable saves."""
import os

import torch

import checkpoint


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
