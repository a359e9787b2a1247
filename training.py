"""What train.py, train_cfg.py and train_cfg_ddp.py share: options, the training step, the loop.

The loop runs the same way on one process and under DDP (`Dist` says which rank this
is); train_cfg_ddp.py only sets up the process group around it.
"""
import argparse
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from tqdm import tqdm

from cli import (UsageError, add_device_arg, add_precision_arg, autocast_dtype, nonnegative_float,
                 nonnegative_int, positive_int, probability, resolve_device)
from checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from data import DataError, load_training_set, make_loader, to_model_range
from ema import EMA
from images import OutputError, check_output_dir, save_grid
from sampling import generate_images
from scheduler import NoiseScheduler

# ----------------------------------------------------------------------------------------
# Options


def add_training_args(parser, *, img_size, patch_size, save_dir, epochs, batch_size, lr):
    """The options every training script has; the defaults that differ are arguments."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", default="./data", help="folder that holds MNIST/ (default: ./data)")
    group.add_argument("--subset", type=positive_int, default=None,
                       help="train on the first N images only (quick trials)")
    group.add_argument("--num_workers", type=nonnegative_int, default=0,
                       help="DataLoader worker processes; 0 gathers batches in the main process, "
                            "which is fastest for MNIST held in memory (default: 0)")

    group = parser.add_argument_group("model")
    group.add_argument("--img_size", type=positive_int, default=img_size)
    group.add_argument("--channels", type=positive_int, default=1)
    group.add_argument("--patch_size", type=positive_int, default=patch_size)
    group.add_argument("--dim", type=positive_int, default=256)
    group.add_argument("--depth", type=positive_int, default=6)
    group.add_argument("--heads", type=positive_int, default=8)
    group.add_argument("--mlp_ratio", type=float, default=4.0)

    group = parser.add_argument_group("diffusion")
    group.add_argument("--timesteps", type=positive_int, default=1000)
    group.add_argument("--schedule", choices=("linear", "cosine"), default="linear")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=positive_int, default=epochs)
    group.add_argument("--batch_size", type=positive_int, default=batch_size,
                       help="images per optimizer step and process (under DDP the global batch "
                            "is batch_size * world_size)")
    group.add_argument("--lr", type=nonnegative_float, default=lr, help="AdamW peak learning rate")
    group.add_argument("--warmup_steps", type=int, default=500,
                       help="linear learning-rate warm-up over this many optimizer steps")
    group.add_argument("--lr_decay_step", type=positive_int, default=None,
                       help="multiply the lr by --lr_decay_rate every N epochs (default: never)")
    group.add_argument("--lr_decay_rate", type=nonnegative_float, default=0.5)
    group.add_argument("--grad_clip", type=nonnegative_float, default=1.0,
                       help="clip the gradient norm to this (0: no clipping)")
    group.add_argument("--ema_decay", type=probability, default=0.9999)
    group.add_argument("--max_steps", type=positive_int, default=None,
                       help="stop after N optimizer steps in all, saving ckpt_final.pt as usual")
    add_precision_arg(group)
    group.add_argument("--compile", action="store_true", help="torch.compile the model")

    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--save_dir", default=save_dir)
    group.add_argument("--save_freq", type=positive_int, default=10,
                       help="write a checkpoint and a preview grid every N epochs")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help="continue the run saved in this checkpoint, with its model and options "
                            "(options given again override them)")
    add_device_arg(parser)


def parse_training_args(parser, argv=None):
    """The training options. With --resume, each option not given again on the command line
    is the one the checkpoint's run used (saved in it), so `--resume CKPT` alone continues
    that run as it was started, and any option given again overrides it."""
    args = parser.parse_args(argv)
    if args.resume is None:
        return args
    saved = load_checkpoint(args.resume)["args"]
    # argparse fills in a default only where the namespace has no value yet
    run_options = {key: value for key, value in saved.items() if key in vars(args) and key != "resume"}
    return parser.parse_args(argv, namespace=argparse.Namespace(**run_options))


# ----------------------------------------------------------------------------------------
# Devices and distribution


@dataclass
class Dist:
    """Where this process stands in a (possibly one-process) training job."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            torch_dist.barrier()

    def from_main(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if self.world_size > 1:
            values = [value]
            torch_dist.broadcast_object_list(values, src=0)
            value = values[0]
        return value

    def first_error(self, error):
        """The first rank's error message (a str, or None when every rank succeeded), on
        every rank: a collective, so that no rank waits forever for one that has failed."""
        if self.world_size > 1:
            errors = [None] * self.world_size
            torch_dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        return error

    def mean(self, tensor):
        """Average a tensor over ranks (a no-op on one process)."""
        if self.world_size > 1:
            tensor = tensor.clone()
            torch_dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor


# ----------------------------------------------------------------------------------------
# The training step


def training_step(model, scheduler, optimizer, x0, labels=None, *, amp_dtype=None, grad_clip=0.0,
                  t=None, noise=None):
    """One optimizer step on the DDPM loss, returns the (detached) loss.

        t ~ U{0, ..., T-1},  eps ~ N(0, I),  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
        loss = || eps - eps_theta(x_t, t [, y]) ||^2     (mean over pixels and batch)

    `labels` is None for model A; for model B the model itself replaces a share of them
    by the null label (train mode). `amp_dtype` is the autocast dtype of the forward pass
    (torch.bfloat16), None for fp32. `t` and `noise` may be given (tests do, to compare runs).
    Under DDP `model` is the DistributedDataParallel wrapper, whose backward averages the
    gradients over ranks.
    """
    if t is None:
        t = scheduler.sample_timesteps(x0.shape[0], device=x0.device)
    x_t, noise = scheduler.noise_image(x0, t, noise)
    with torch.autocast(x0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        pred_noise = model(x_t, t) if labels is None else model(x_t, t, labels)
    loss = F.mse_loss(pred_noise.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def make_optimizer(model, lr, device):
    """AdamW without weight decay. The fused kernel (one pass over all parameters) on CPU and
    CUDA: on 2 CPU cores it took the AdamW step of a 2.3 M-parameter model from 14.2 to 3.4 ms."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0,
                             fused=torch.device(device).type in ("cpu", "cuda"))


def learning_rate(args, step, steps_per_epoch):
    """Linear warm-up, then a step decay every --lr_decay_step epochs. Depends only on the
    global step, so every rank computes the same value."""
    warmup = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0
    decay = 1.0
    if args.lr_decay_step:
        decay = args.lr_decay_rate ** (step // (args.lr_decay_step * steps_per_epoch))
    return args.lr * warmup * decay


# ----------------------------------------------------------------------------------------
# Stopping cleanly


class StopFlag:
    """The first Ctrl-C / SIGTERM asks the loop to save and stop after the current step;
    a second Ctrl-C stops at once."""

    def __init__(self, announce):
        self.requested = False
        self.announce = announce
        self.previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nstopping: saving a resumable checkpoint after this step "
                  "(Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------------------
# The loop


def build_checkpoint(kind, model, ema, optimizer, scheduler, args, epoch, step, batch_in_epoch,
                     world_size, device):
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)  # the training GPU's, not the current one's
    return {
        "kind": kind,
        "model_config": dict(model.config),
        "scheduler_config": scheduler.config,
        "model": clean_state_dict(model.state_dict()),
        "ema": clean_state_dict(ema.state_dict()),
        "ema_updates": ema.num_updates,
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "batch_in_epoch": batch_in_epoch,
        "world_size": world_size,
        "rng": rng,
        "args": {key: value for key, value in vars(args).items()},
    }


def check_resume_options(args, resume, world_size):
    """Refuse options given with --resume that the run cannot take: a different model or
    noise schedule (both are the checkpoint's), or, for a run stopped mid-epoch, anything that
    would cut that epoch's batches differently from the ones it was part-way through."""
    run_config = dict(resume["model_config"], **resume["scheduler_config"])
    changed = [f"--{key} {getattr(args, key)} (the checkpoint's is {value})"
               for key, value in run_config.items() if getattr(args, key, value) != value]
    if changed:
        raise UsageError(f"{args.resume} holds a model and schedule of its own, but {', '.join(changed)}: "
                         "leave these options out to resume, or start a new run")
    if resume["batch_in_epoch"] == 0:
        return  # at an epoch boundary any batching can follow
    saved = dict(resume["args"], world_size=resume.get("world_size", world_size))
    given = dict(vars(args), world_size=world_size)
    changed = [f"{key} {saved[key]} -> {given[key]}" for key in ("batch_size", "subset", "seed", "world_size")
               if saved.get(key) != given[key]]
    if changed:
        raise UsageError(f"{args.resume} stopped in the middle of an epoch; resuming it needs the same "
                         f"batches, but {', '.join(changed)} (leave these options out, or resume "
                         "from a checkpoint saved at the end of an epoch)")


def save_preview(ema_model, scheduler, preview_labels, num_preview, path, device, amp_dtype):
    """A grid of samples from the EMA weights (one row per digit for model B, guided), drawn
    with infer.py's default sampler and guidance scale."""
    images = generate_images(ema_model, scheduler, num_preview, labels=preview_labels, seed=0,
                             device=device, amp_dtype=amp_dtype, progress=False)
    nrow = num_preview // 10 if preview_labels is not None else int(num_preview ** 0.5)
    save_grid(images, path, nrow=nrow)


def train(args, model_class, model_config, preview_labels=None, num_preview=16, dist=Dist(),
          device=None):
    """Train `model_class(**model_config)` on MNIST as `args` say; returns the final checkpoint path."""
    log = print if dist.is_main else (lambda *a, **k: None)
    device = device or resolve_device(args.device)
    amp_dtype = autocast_dtype(args.precision, device)
    kind = model_class.kind
    # Rank 0 is the only writer: a save_dir it cannot write would lose the run. Every rank
    # raises its error, so that none is left waiting for a rank 0 that has stopped.
    save_dir_error = None
    if dist.is_main:
        try:
            check_output_dir(args.save_dir)
        except OutputError as err:
            save_dir_error = str(err)
    save_dir_error = dist.from_main(save_dir_error)
    if save_dir_error:
        raise OutputError(save_dir_error)

    resume = load_checkpoint(args.resume, expected_kind=kind) if args.resume else None
    if resume is not None:
        check_resume_options(args, resume, dist.world_size)  # before any work
        model_config = resume["model_config"]
        scheduler_config = resume["scheduler_config"]
    else:
        scheduler_config = dict(timesteps=args.timesteps, schedule=args.schedule)

    # tiny gradients late in training become float32 subnormals, which x86 CPUs process
    # up to ~10x slower; flushing them to zero costs nothing in accuracy
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = model_class(**model_config).to(device)
    scheduler = NoiseScheduler(**scheduler_config, device=device)

    # MNIST, in turns, so that no two processes download into the same folder at once: rank 0
    # first, then the first process of each other machine (it downloads only where --data_dir
    # is not shared between machines), then all the others. A failure anywhere stops every rank.
    data = None
    for my_turn, download in ((dist.is_main, True), (dist.local_rank == 0, True), (True, False)):
        error = None
        if my_turn and data is None:
            try:
                data = load_training_set(args.data_dir, model.img_size, model.channels, args.subset,
                                         download=download)
            except DataError as err:
                error = str(err)
        error = dist.first_error(error)
        if error:
            raise DataError(error)
    images, labels = data
    if device.type == "cuda" and args.num_workers == 0:
        images, labels = images.to(device), labels.to(device)  # the whole set lives on the GPU
    loader = make_loader(images, labels, args.batch_size, args.seed, dist.rank, dist.world_size,
                         args.num_workers, pin_memory=device.type == "cuda" and args.num_workers > 0)
    steps_per_epoch = len(loader)

    optimizer = make_optimizer(model, args.lr, device)
    ema = EMA(model, args.ema_decay)
    epoch, step, batch_in_epoch = 0, 0, 0
    if resume is not None:
        model.load_state_dict(clean_state_dict(resume["model"]))
        ema.load_state_dict(clean_state_dict(resume["ema"]), resume["ema_updates"])
        optimizer.load_state_dict(resume["optimizer"])
        epoch, step, batch_in_epoch = resume["epoch"], resume["step"], resume["batch_in_epoch"]
        log(f"resumed from {args.resume} at epoch {epoch}, step {step}")

    # noise, timesteps and label dropout: a different stream on each rank
    if resume is not None and dist.world_size == 1:
        torch.set_rng_state(resume["rng"]["cpu"])
        if "cuda" in resume["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
    else:
        torch.manual_seed(args.seed + dist.rank + dist.world_size * step)

    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    stop = StopFlag(announce=dist.is_main)

    def save(name, preview_name=None):
        if dist.is_main:
            state = build_checkpoint(kind, model, ema, optimizer, scheduler, args, epoch, step,
                                     batch_in_epoch, dist.world_size, device)
            path = os.path.join(args.save_dir, name)
            save_checkpoint(state, path)
            if preview_name:
                save_preview(ema.module, scheduler, preview_labels, num_preview,
                             os.path.join(args.save_dir, preview_name), device, amp_dtype)
            log(f"saved {path}")
        dist.barrier()

    log(f"training {kind} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) on "
        f"{len(images)} images, {device}, {'bf16 autocast' if amp_dtype else 'fp32'}, "
        f"world size {dist.world_size}, global batch {args.batch_size * dist.world_size}")
    stopped = False
    try:
        while epoch < args.epochs and not (args.max_steps and step >= args.max_steps):
            loader.sampler.sampler.set_epoch(epoch)
            model.train()
            loss_sum = torch.zeros((), device=device)
            seen, start = 0, time.perf_counter()
            bar = tqdm(itertools.islice(loader, batch_in_epoch, None), total=steps_per_epoch,
                       initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not dist.is_main, dynamic_ncols=True, leave=False)
            for images_u8, batch_labels in bar:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(args, step, steps_per_epoch)
                x0 = to_model_range(images_u8, device)
                batch_labels = batch_labels.to(device, non_blocking=True) if kind == "dit_cfg" else None
                loss = training_step(train_model, scheduler, optimizer, x0, batch_labels,
                                     amp_dtype=amp_dtype, grad_clip=args.grad_clip)
                ema.update(model)
                step += 1
                batch_in_epoch += 1
                loss_sum += loss
                seen += 1
                if seen % 10 == 0 or batch_in_epoch == steps_per_epoch:  # sync only now and then
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(loss=f"{dist.mean(loss_sum).item() / seen:.4f}",
                                    img_s=f"{seen * args.batch_size * dist.world_size / elapsed:.0f}")
                stopped = stop.requested
                if dist.world_size > 1:
                    # One rank's signal stops them all at the same step. Ranks compare notes
                    # every 10 steps only, since reading the flag back syncs host and GPU.
                    stopped = False
                    if step % 10 == 0:
                        flag = torch.tensor(float(stop.requested), device=device)
                        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
                        stopped = bool(flag.item())
                if stopped or (args.max_steps and step >= args.max_steps):
                    break
            bar.close()
            elapsed = time.perf_counter() - start
            if seen:
                log(f"epoch {epoch + 1}/{args.epochs}  step {step}  "
                    f"loss {dist.mean(loss_sum).item() / seen:.4f}  "
                    f"{seen * args.batch_size * dist.world_size / elapsed:.0f} img/s  "
                    f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed:.0f}s")
            if stopped:
                break
            if batch_in_epoch == steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
                if epoch % args.save_freq == 0 and epoch < args.epochs:
                    save(f"ckpt_epoch_{epoch}.pt", f"preview_epoch_{epoch}.png")
    finally:
        stop.restore()

    if stopped:
        save("ckpt_interrupted.pt")
        log(f"stopped at epoch {epoch}, step {step}; continue with "
            f"--resume {os.path.join(args.save_dir, 'ckpt_interrupted.pt')} "
            "(the other options are read from the checkpoint)")
    else:
        save("ckpt_final.pt", "preview_final.png")
    return os.path.join(args.save_dir, "ckpt_interrupted.pt" if stopped else "ckpt_final.pt")
