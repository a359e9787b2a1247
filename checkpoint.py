"""Checkpoint files: plain dicts of tensors and numbers, written atomically, read safely.

A training checkpoint holds
    kind              "unconditional" (model A) or "class_conditional" (model B)
    model_config      the model's keyword arguments, so inference never repeats them
    scheduler_config  the NoiseScheduler's keyword arguments
    model, ema        state dicts (no "module." / "_orig_mod." prefixes)
    optimizer         the optimizer's state dict; grad_scaler: the fp16 GradScaler's, or None
    epoch, step       epochs completed and optimizer steps taken
    batch_in_epoch    batches of the current epoch already trained on (mid-epoch stops)
    ema_updates       how many updates the EMA has seen
    world_size        processes that trained it; elapsed_s: training wall time so far
    rng               torch's CPU (and CUDA) random state, to resume the same random stream
    args              the training arguments, as a dict
    guide             (model A trained with --guide_epoch K, from epoch K on) the EMA weights
                      (with --guide_ema_power: the power-function average) at the end of epoch
                      K: the weak model of autoguidance (sampling.py)
    guide_average     (with --guide_ema_power, before the end of epoch K) that average so far;
                      its count of updates is ema_updates
    guide_config      the guide's keyword arguments (with --grow_epoch it can be shallower
                      than the model); a checkpoint without it has a guide of model_config
A weights file (pretrained/, written by export_weights) holds kind, the two configs, ema,
the guide and its config if any, and args: enough to sample, not to resume. Both are read with
torch.load(weights_only=True), which cannot run code from the file.
"""
import os

import torch

from dit import DiT
from dit_cfg import ConditionalDiT
from scheduler import NoiseScheduler

MODEL_CLASSES = {DiT.kind: DiT, ConditionalDiT.kind: ConditionalDiT}
MODEL_NAMES = {DiT.kind: "model A (unconditional DiT, train.py/infer.py)",
               ConditionalDiT.kind: "model B (conditional DiT, train_cfg.py/infer_cfg.py)"}
# the same kinds as some checkpoints name them: after the models' modules
KIND_BY_MODULE = {"dit": DiT.kind, "dit_cfg": ConditionalDiT.kind}
REQUIRED_KEYS = ("kind", "model_config", "scheduler_config", "ema")
TRAINING_STATE_KEYS = ("model", "optimizer", "epoch", "step", "batch_in_epoch", "ema_updates", "rng", "args")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why in one line."""


def clean_state_dict(state_dict):
    """Strip the prefixes that DistributedDataParallel and torch.compile add to names."""
    cleaned = {}
    for name, tensor in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        cleaned[name] = tensor
    return cleaned


def save_checkpoint(state, path):
    """torch.save `state` (any checkpoint-like dict) to a temporary file, then rename: an
    interrupted save never corrupts `path`, and readers see the old file or the whole new one.

    Both the file and the rename are flushed to the disk (fsync) before this returns: without
    that, a power loss soon after a save can leave `path` empty or truncated, or the old file
    back in place, since the OS writes its caches out later."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the file's bytes
        os.replace(tmp_path, path)  # atomic on POSIX and Windows
        fsync_folder(folder)  # the rename, which lives in the folder's entries
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def fsync_folder(folder):
    """Flush a folder's entries to the disk (POSIX; Windows cannot open a folder for this)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def one_line_reason(err):
    """Why a load failed, for a one-line error: the first line of the exception's message
    (its type name when the message is empty), at most 200 characters."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


def load_checkpoint(path, expected_kind=None, map_location="cpu", to_resume=False):
    """Read and validate a checkpoint (to_resume: one with the whole training state);
    CheckpointError with a one-line reason otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): "
                              f"{one_line_reason(err)}") from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a SimplestDiffusion checkpoint "
                              f"(expected a dict with keys {', '.join(REQUIRED_KEYS)})")
    ckpt["kind"] = KIND_BY_MODULE.get(ckpt["kind"], ckpt["kind"])
    if ckpt["kind"] not in MODEL_CLASSES:
        raise CheckpointError(f"{path} holds an unknown model kind {ckpt['kind']!r}")
    if expected_kind is not None and ckpt["kind"] != expected_kind:
        raise CheckpointError(f"{path} holds {MODEL_NAMES[ckpt['kind']]}, but this script needs "
                              f"{MODEL_NAMES[expected_kind]}")
    if to_resume and any(key not in ckpt for key in TRAINING_STATE_KEYS):
        raise CheckpointError(f"{path} holds weights only, without the training state that --resume "
                              "continues from (optimizer, step, random state): start a new run")
    return ckpt


def network(ckpt, weights="ema"):
    """The checkpoint's model class (train mode, CPU) holding its `weights`: "ema", "model"
    (the raw weights) or "guide" (built from guide_config where the checkpoint has one)."""
    config = ckpt.get("guide_config", ckpt["model_config"]) if weights == "guide" else ckpt["model_config"]
    model = MODEL_CLASSES[ckpt["kind"]](**config)
    try:
        model.load_state_dict(clean_state_dict(ckpt[weights]))
    except RuntimeError as err:
        raise CheckpointError(f"the checkpoint's {weights} weights do not match its model config: "
                              f"{one_line_reason(err)}") from None
    return model


def build_model(ckpt, use_ema=True, device="cpu"):
    """(model in eval mode, NoiseScheduler) rebuilt from a loaded checkpoint."""
    if not use_ema and "model" not in ckpt:
        raise CheckpointError("this file holds only the EMA weights (shipped weights): "
                              "sample without --no_ema")
    model = network(ckpt, "ema" if use_ema else "model")
    scheduler = NoiseScheduler(**ckpt["scheduler_config"], device=device)
    return model.to(device).eval(), scheduler


def build_guide(ckpt, device="cpu"):
    """Model A's guide network (eval mode) from a loaded checkpoint, or None if it has none."""
    return network(ckpt, "guide").to(device).eval() if "guide" in ckpt else None


def load_model(path, device="cpu", use_ema=True, expected_kind=None):
    """Checkpoint path -> (model, scheduler, checkpoint dict)."""
    ckpt = load_checkpoint(path, expected_kind)
    model, scheduler = build_model(ckpt, use_ema, device)
    return model, scheduler, ckpt


def export_weights(ckpt_path, out_path, dtype=None):
    """Write the EMA weights of a training checkpoint, with what rebuilds and describes them
    (kind, configs, training options), to out_path: the pretrained/ files. About a quarter of
    the checkpoint's size: no raw weights, no optimizer moments.

    dtype (e.g. torch.bfloat16) stores the floating-point weights in that dtype: half the
    size again. `network` loads them back into float32 parameters (load_state_dict casts),
    so each weight is the float32 one rounded to 8 significant bits; under bf16 autocast the
    matmuls round their weights so anyway."""
    ckpt = load_checkpoint(ckpt_path, to_resume=True)
    weights = {key: ckpt[key] for key in ("kind", "model_config", "scheduler_config", "args")}
    if "guide_config" in ckpt:
        weights["guide_config"] = ckpt["guide_config"]
    for key in ("ema", "guide") if "guide" in ckpt else ("ema",):
        weights[key] = {name: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point()
                               else tensor).contiguous()
                        for name, tensor in clean_state_dict(ckpt[key]).items()}
    weights["step"] = ckpt["step"]
    save_checkpoint(weights, out_path)
