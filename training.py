"""The training path of train.py, train_cfg.py and train_cfg_ddp.py, in reading order:

    add_training_args  the options every training script has
    resolve_run        (command line, optional checkpoint to resume) -> Run: the options, the
                       model and schedule configs and the state to continue from, read once
    training_step      one optimizer step on the DDPM loss
    grow_by_stacking   (model A's --grow_epoch) depth D -> 2D, blocks, averages and AdamW moments alike
    train              setup -> loop -> save

The helpers between them are named for what they protect (a run stopped by Ctrl-C, a rank
that fails while the others wait, a resumed run that must continue exactly). Under DDP every
rank runs this same code; train_cfg_ddp.py only joins the process group around it.
"""
import argparse
import copy
import csv
import inspect
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

from checkpoint import MODEL_NAMES, build_guide, clean_state_dict, load_checkpoint, save_checkpoint
from data import DataError, load_training_set, make_loader, to_model_range
from dit import GELU_APPROXIMATIONS
from ema import EMA, PowerEMA
from images import OutputError, check_output_dir, save_grid
from options import (AMP_DTYPES, UsageError, add_device_arg, add_precision_arg, decay_below_one,
                     nonnegative_float, nonnegative_float_or_none, nonnegative_int, positive_int, probability,
                     resolve_device, resolve_precision)
from sampling import (DEFAULT_AUTOGUIDANCE_MAX_SNR, DEFAULT_AUTOGUIDANCE_MIN_SNR, DEFAULT_AUTOGUIDANCE_SCALE,
                      DEFAULT_GUIDANCE_SCALE, PREVIEW_SAMPLER, PREVIEW_STEPS, generate_images, run_autoguidance)
from scheduler import LOSS_WEIGHTINGS, PREDICTIONS, SCHEDULES, NoiseScheduler

LOG_EVERY = 10  # optimizer steps between rows of metrics.csv (and progress-bar updates)
# Model A's guide where a new run names none: the EMA of epoch 20. It takes the 28x28 stand-in of
# train.py's defaults to the CPU recipes' quality, which the model alone does not reach, and late in
# the run it keeps the digits more even than the EMA of epoch 10
# (docs/results.md, "Model A's defaults at 28x28 on 2 CPU cores").
DEFAULT_GUIDE_EPOCH = 20

# ----------------------------------------------------------------------------------------
# Options


def add_training_args(parser, *, img_size, patch_size, save_dir, epochs, batch_size, lr, guide=False):
    """The options every training script has; the defaults that differ are arguments.
    guide: add --guide_epoch (model A: autoguidance needs no labels)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", default="./data", help="folder that holds MNIST/")
    group.add_argument("--subset", type=positive_int, default=None,
                       help="train on the first N images only (quick trials)")
    group.add_argument("--num_workers", type=nonnegative_int, default=0,
                       help="DataLoader worker processes; 0 gathers batches in the main process, "
                            "which is fastest for MNIST held in memory")

    group = parser.add_argument_group("model")
    group.add_argument("--img_size", type=positive_int, default=img_size, help="MNIST is resized to this")
    group.add_argument("--channels", type=positive_int, default=1, help="image channels")
    group.add_argument("--patch_size", type=positive_int, default=patch_size, help="pixels per token side")
    group.add_argument("--dim", type=positive_int, default=256, help="token width")
    group.add_argument("--depth", type=positive_int, default=6, help="transformer blocks")
    group.add_argument("--heads", type=positive_int, default=8, help="attention heads")
    group.add_argument("--mlp_ratio", type=float, default=4.0, help="MLP hidden width / dim")
    group.add_argument("--gelu_approximate", choices=GELU_APPROXIMATIONS, default="tanh",
                       help="the MLP's GELU: tanh, its tanh approximation (as in DiT); none, the exact "
                            "x Phi(x), which runs faster on a CPU")

    group = parser.add_argument_group("diffusion")
    group.add_argument("--timesteps", type=positive_int, default=1000, help="diffusion steps T")
    group.add_argument("--schedule", choices=SCHEDULES, default="linear",
                       help="noise schedule (linear: Ho et al., its betas scaled by 1000/T; "
                            "cosine: Nichol & Dhariwal)")
    # v and min-SNR-5 are the defaults because they train faster at every size measured
    # (docs/results.md: the 28x28 ablation on 2 CPU cores and the full-size runs on the H200).
    group.add_argument("--prediction", choices=PREDICTIONS, default="v",
                       help="what the model outputs: the noise (eps) or the velocity v = sqrt(ab_t) eps - "
                            "sqrt(1-ab_t) x0 (Salimans & Ho)")
    group.add_argument("--loss_weighting", choices=LOSS_WEIGHTINGS, default="min_snr",
                       help="how each timestep's loss is weighted: min_snr, by min-SNR-gamma (Hang et "
                            "al.); p2, by P2 (Choi et al.; k = gamma = 1), which keeps the weight of the "
                            "noisy steps and lowers that of the nearly clean ones")
    group.add_argument("--min_snr_gamma", type=nonnegative_float, default=5.0,
                       help="the gamma of --loss_weighting min_snr (5 in the paper); "
                            "0: every timestep weighs the same")
    group.add_argument("--importance_sampling", action="store_true",
                       help="with loss weights (p2, or min_snr with a gamma above 0): draw each t in "
                            "proportion to its weight instead of uniformly, and drop the weight (the same "
                            "expected loss, no steps spent on timesteps that weigh next to nothing)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the data")
    group.add_argument("--batch_size", type=positive_int, default=batch_size,
                       help="images per optimizer step and process (under DDP the global batch "
                            "is batch_size * world_size)")
    group.add_argument("--lr", type=nonnegative_float, default=lr, help="AdamW peak learning rate")
    group.add_argument("--adam_beta2", type=decay_below_one, default=0.999,
                       help="AdamW's beta2, the decay of its running mean of squared gradients "
                            "(0.99 averages over about 100 steps, 0.999 over about 1000)")
    group.add_argument("--warmup_steps", type=int, default=500,
                       help="linear learning-rate warm-up over this many optimizer steps")
    group.add_argument("--lr_decay_step", type=positive_int, default=None,
                       help="multiply the lr by --lr_decay_rate every N epochs (none given: never)")
    group.add_argument("--lr_decay_rate", type=nonnegative_float, default=0.5,
                       help="factor of each --lr_decay_step decay")
    group.add_argument("--grad_clip", type=nonnegative_float, default=1.0,
                       help="clip the gradient norm to this (0: no clipping)")
    group.add_argument("--ema_decay", type=probability, default=0.9999,
                       help="decay of the weights' moving average that sampling uses")
    group.add_argument("--max_steps", type=positive_int, default=None,
                       help="stop after N optimizer steps in all, saving ckpt_final.pt as usual")
    add_precision_arg(group)
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    if guide:
        group.add_argument("--guide_epoch", type=nonnegative_int, default=None, metavar="K",
                           help="keep the EMA weights of the end of epoch K (or their power average, "
                                "--guide_ema_power) in the later checkpoints as the guide of "
                                "autoguidance: sampling runs guide + s (model - guide), s = "
                                "--guidance_scale (infer.py's, else this run's); 0: no guide; none "
                                f"given: {DEFAULT_GUIDE_EPOCH} in a run of more than {DEFAULT_GUIDE_EPOCH} "
                                "epochs, else no guide")
        group.add_argument("--guide_ema_power", type=nonnegative_float_or_none, default=None, metavar="GAMMA",
                           help="make the guide the power-function average of the weights up to the end "
                                "of epoch K instead of their EMA, step k weighing in proportion to k^GAMMA "
                                "(EDM2, Karras et al. 2024): the smaller GAMMA, the longer the stretch "
                                "averaged; none (the default): the EMA")
        group.add_argument("--guidance_scale", type=nonnegative_float_or_none, default=None, metavar="S",
                           help="the autoguidance scale s that infer.py, evaluate.py and the previews use "
                                "for this run's checkpoints unless given one: it suits the guide (a "
                                "narrower guide average takes a larger s); none given: "
                                f"{DEFAULT_AUTOGUIDANCE_SCALE:g}")
        group.add_argument("--guidance_min_snr", type=nonnegative_float_or_none, default=None, metavar="S",
                           help="the lowest signal-to-noise ratio ab_t / (1 - ab_t) of the steps that "
                                "infer.py, evaluate.py and the previews guide for this run's checkpoints "
                                "unless given one: the noisier steps, where the digit's class is settled, "
                                "go to the model alone, so that guidance does not amplify the guide's own "
                                f"class bias; none given: {DEFAULT_AUTOGUIDANCE_MIN_SNR:g} (from the noisiest step)")
        group.add_argument("--grow_epoch", type=nonnegative_int, default=None, metavar="E",
                           help="train --depth / 2 blocks for the first E epochs (each in about half "
                                "the time), then stack them into --depth blocks: blocks i and "
                                "i + depth/2 start as copies of block i, with its EMA weights and AdamW "
                                "moments. A --guide_epoch up to E keeps the shallow network as the "
                                "guide; 0 or none given: --depth blocks throughout")

    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=0, help="initial weights, data order, noise")
    group.add_argument("--save_dir", default=save_dir,
                       help="checkpoints, previews, metrics.csv and options.args go here")
    group.add_argument("--save_freq", type=positive_int, default=10,
                       help="write a checkpoint and a preview grid every N epochs")
    group.add_argument("--resume", default=None, metavar="CKPT",
                       help="continue the run saved in this checkpoint, with its model and options "
                            "(options given again override them)")
    add_device_arg(parser)


def depth_at(args, epoch):
    """The blocks the network has after `epoch` completed epochs: half of --depth before --grow_epoch."""
    grow_epoch = getattr(args, "grow_epoch", None)  # model A's option; 0 or None: never grows
    return args.depth // 2 if grow_epoch and epoch < grow_epoch else args.depth


def model_options(args):
    """The DiT's keyword arguments that add_training_args' "model" options set."""
    return dict(img_size=args.img_size, channels=args.channels, patch_size=args.patch_size,
                dim=args.dim, depth=args.depth, heads=args.heads, mlp_ratio=args.mlp_ratio,
                gelu_approximate=args.gelu_approximate)


def scheduler_options(args):
    """The NoiseScheduler's keyword arguments that the "diffusion" options set."""
    return dict(timesteps=args.timesteps, schedule=args.schedule, prediction=args.prediction)


@dataclass
class Run:
    """Everything a training run starts from, resolved once from the command line."""
    args: argparse.Namespace  # the options; a resumed run's own, with those given again on top
    model_class: type
    model_config: dict        # model_class(**model_config): the network the run starts or resumes with
    scheduler_config: dict    # NoiseScheduler(**scheduler_config)
    parser: argparse.ArgumentParser  # that read the options (options.args is written from it)
    resume: dict = None       # the checkpoint to continue from, or None for a new run


def resolve_run(parser, argv, model_class, model_config):
    """(command line, optional --resume checkpoint) -> Run.

    With --resume, each option not given again on the command line is the one the
    checkpoint's run used, so `--resume CKPT` alone continues that run as it was started;
    an option given again overrides it, except the model and the noise schedule, which are
    the checkpoint's. `model_config(args)` turns the options into the model's kwargs."""
    args = parser.parse_args(argv)
    if args.resume is None:
        if getattr(args, "guide_epoch", 0) is None:  # model A: decided now, so that options.args and
            # the checkpoints name it (0 for none); a resumed run keeps its own (None: no guide)
            args.guide_epoch = DEFAULT_GUIDE_EPOCH if args.epochs > DEFAULT_GUIDE_EPOCH else 0
        config = dict(model_config(args), depth=depth_at(args, 0))
        return Run(args, model_class, config, scheduler_options(args), parser)
    resume = load_checkpoint(args.resume, expected_kind=model_class.kind, to_resume=True)
    saved = {key: value for key, value in resume["args"].items() if key in vars(args) and key != "resume"}
    # argparse fills in a default only where the namespace has no value yet
    args = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
    given = dict(model_config(args), depth=depth_at(args, resume["epoch"]), **scheduler_options(args))
    # rebuilt through NoiseScheduler, and the model's keyword defaults filled in: a checkpoint
    # written before an option existed gets its default
    scheduler_config = NoiseScheduler(**resume["scheduler_config"]).config
    defaults = {name: parameter.default for name, parameter in inspect.signature(model_class).parameters.items()
                if parameter.default is not inspect.Parameter.empty}  # a required one is in every config
    saved_model_config = dict(defaults, **resume["model_config"])
    saved_config = dict(saved_model_config, **scheduler_config)

    def differs(key, value):
        if key == "depth" and getattr(args, "grow_epoch", None) is not None:  # model A: depth_at's blocks
            return (f"--depth {args.depth} with --grow_epoch {args.grow_epoch}: {given[key]} blocks after "
                    f"epoch {resume['epoch']} (the checkpoint's are {value})")
        return f"--{key} {given[key]} (the checkpoint's is {value})"
    changed = [differs(key, value) for key, value in saved_config.items() if key in given and given[key] != value]
    if changed:
        raise UsageError(f"{args.resume} holds a model and schedule of its own, but {', '.join(changed)}: "
                         "leave these options out to resume, or start a new run")
    return Run(args, model_class, saved_model_config, scheduler_config, parser, resume)


def write_options_file(args, parser, path):
    """The run's resolved options as a recipe: `python SCRIPT @path` trains the same run anew."""
    lines = [f"# the options of this run; to train it again: python {parser.prog} @{path}"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "resume"):
            continue
        value = getattr(args, action.dest)
        if value is None or value is False:  # an option left to its automatic choice, a flag off
            continue
        lines.append(action.option_strings[0] if value is True else f"{action.option_strings[0]} {value}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------
# The training step


def has_loss_weights(loss_weighting, min_snr_gamma):
    """False where every timestep weighs the same: "min_snr" with gamma None (older checkpoints) or 0."""
    return loss_weighting == "p2" or bool(min_snr_gamma)


def loss_weights(scheduler, t, loss_weighting, min_snr_gamma):
    """(B,) loss weights of the timesteps t (B,): P2's for "p2", else min-SNR-gamma's."""
    return scheduler.p2_weights(t) if loss_weighting == "p2" else scheduler.min_snr_weights(t, min_snr_gamma)


def training_step(model, scheduler, optimizer, x0, labels=None, *, amp_dtype=None, grad_scaler=None,
                  grad_clip=0.0, loss_weighting="min_snr", min_snr_gamma=None, importance_sampling=False,
                  t=None, noise=None):
    """One optimizer step on the DDPM loss, returns the (detached) loss.

        t ~ U{0, ..., T-1},  eps ~ N(0, I),  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps
        loss = mean_b w(t_b) || target_b - model(x_t, t [, y])_b ||^2 / (C H W)

    target: eps, or v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 for a scheduler with prediction
    "v"; w: P2's weights (scheduler.p2_weights) for loss_weighting "p2", min-SNR's
    (scheduler.min_snr_weights) for "min_snr", or 1 for "min_snr" with `min_snr_gamma` None or 0.
    importance_sampling (needs weights): t ~ P(t) = w(t) / sum_s w(s) and every image
    weighs mean_s w(s), an estimate of the same expected loss,
        E_{t~U}[w(t) L_t] = (1/T) sum_t w(t) L_t = mean_s w(s) * E_{t~P}[L_t],
    without the images a uniform draw spends on timesteps of weight near 0 (with v and
    gamma 5 on the linear schedule, the half of them above t = 500 carry 3.5% of the weight).

    `labels` is None for model A; for model B the model itself replaces a share of them
    by the null label (train mode). `amp_dtype` is the autocast dtype of the forward pass
    (torch.bfloat16 or torch.float16), None for fp32. fp16 needs `grad_scaler` (a
    torch.amp.GradScaler): its gradients would underflow unscaled. `t` and `noise` may be
    given (tests do, to compare runs). Under DDP `model` is the DistributedDataParallel
    wrapper, whose backward averages the gradients over ranks.
    """
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss_weighting {loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    weighted = has_loss_weights(loss_weighting, min_snr_gamma)
    if importance_sampling and not weighted:
        raise ValueError("importance_sampling draws t by the loss weights: it needs loss_weighting 'p2' "
                         "or min_snr_gamma > 0")
    if importance_sampling:
        all_weights = loss_weights(scheduler, torch.arange(scheduler.num_timesteps, device=x0.device),
                                   loss_weighting, min_snr_gamma)  # (T,)
    if t is None:
        t = scheduler.sample_timesteps(x0.shape[0], device=x0.device,
                                       weights=all_weights if importance_sampling else None)
    x_t, noise = scheduler.noise_image(x0, t, noise)
    target = scheduler.training_target(x0, noise, t)
    with torch.autocast(x0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        output = model(x_t, t) if labels is None else model(x_t, t, labels)
    if not weighted:
        loss = F.mse_loss(output.float(), target)
    else:
        per_image = (output.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
        # () under importance sampling, else the (B,) weights of the drawn t
        weights = (all_weights.mean() if importance_sampling
                   else loss_weights(scheduler, t, loss_weighting, min_snr_gamma))
        loss = (weights * per_image).mean()
    optimizer.zero_grad(set_to_none=True)
    if grad_scaler is None:
        loss.backward()
    else:
        grad_scaler.scale(loss).backward()  # loss * S: small fp16 gradients stay representable
        grad_scaler.unscale_(optimizer)     # back to true gradients before clipping
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if grad_scaler is None:
        optimizer.step()
    else:
        grad_scaler.step(optimizer)  # skipped when a gradient overflowed; S then shrinks
        grad_scaler.update()
    return loss.detach()


def make_optimizer(model, lr, device, beta2=0.999):
    """AdamW without weight decay, betas (0.9, beta2). The fused kernel (one pass over all
    parameters) on CPU and CUDA: it makes the AdamW step of a 2.3 M-parameter model several
    times faster on 2 CPU cores (docs/performance.md)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.0,
                             fused=torch.device(device).type in ("cpu", "cuda"))


def grow_by_stacking(model, ema, optimizer, device, guide_average=None):
    """(model, ema, optimizer, guide_average) of depth D -> the same of depth 2D, by progressive
    stacking (Gong et al., "Efficient Training of BERT by Progressively Stacking", ICML 2019):
    block i + D starts as a copy of block i, so blocks 0..2D-1 are [0..D-1, 0..D-1], and every
    other layer is kept. The averaged weights (the EMA, and the guide's power average where one
    is kept) and AdamW's moments and step counts are stacked alike, so the new blocks carry on
    where their sources were rather than start cold.
    The stacked network is not the same function (each block now runs twice): the loss jumps
    for some tens of steps, then goes on from where it was."""
    depth = model.config["depth"]

    def source(name):  # the depth-D name a depth-2D parameter is copied from
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            return f"blocks.{int(index) % depth}.{rest}"
        return name

    # building it draws random initial weights, all overwritten below: keep them off the stream
    # that training draws its noise from, so that growing changes no later draw
    with torch.random.fork_rng(devices=[]):
        deep = type(model)(**dict(model.config, depth=2 * depth)).to(device)

    def stacked(state_dict):  # a depth-D state dict -> the depth-2D one, each tensor its own copy
        return {name: state_dict[source(name)].clone() for name in deep.state_dict()}

    deep.load_state_dict(stacked(model.state_dict()))
    deep_ema = ema.over(deep, stacked(ema.state_dict()))
    deep_guide_average = (None if guide_average is None
                          else guide_average.over(deep, stacked(guide_average.state_dict())))

    saved = optimizer.state_dict()  # moments keyed by the parameter's place in model.parameters()
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    deep_names = [name for name, _ in deep.named_parameters()]
    moments = {i: {key: value.clone() for key, value in saved["state"][index[source(name)]].items()}
               for i, name in enumerate(deep_names) if index[source(name)] in saved["state"]}
    (group,) = saved["param_groups"]
    deep_optimizer = make_optimizer(deep, group["lr"], device, group["betas"][1])
    deep_optimizer.load_state_dict({"state": moments,
                                    "param_groups": [dict(group, params=list(range(len(deep_names))))]})
    return deep, deep_ema, deep_optimizer, deep_guide_average


def learning_rate(args, step, epoch):
    """Linear warm-up over the first --warmup_steps optimizer steps, then the peak --lr times
    --lr_decay_rate once every --lr_decay_step completed epochs.

    The decay counts epochs, not steps: a run resumed with another batch or world size (so
    another number of steps per epoch) keeps its schedule. Every rank computes the same value."""
    warmup = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0
    decay = args.lr_decay_rate ** (epoch // args.lr_decay_step) if args.lr_decay_step else 1.0
    return args.lr * warmup * decay


# ----------------------------------------------------------------------------------------
# Several processes


@dataclass
class Ranks:
    """This process's place among the training processes (one, or a DDP job's world), and the
    few collectives the loop needs. With one process every collective is a no-op."""
    rank: int = 0
    local_rank: int = 0  # the rank on this machine
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def first_error(self, error):
        """The first rank's error message (a str, or None when every rank succeeded), on
        every rank: a collective, so that no rank waits forever for one that has failed."""
        if self.world_size > 1:
            errors = [None] * self.world_size
            torch_dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        return error

    def mean(self, tensor):
        """Average a tensor over ranks."""
        if self.world_size > 1:
            tensor = tensor.clone()
            torch_dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def any(self, flag, device):
        """True on every rank when `flag` is True on any."""
        if self.world_size > 1:
            value = torch.tensor(float(flag), device=device)
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
            flag = bool(value.item())
        return flag


def stop_every_rank_unless_writable(save_dir, ranks):
    """Rank 0 is the only writer: a save_dir it cannot write would lose the run. It checks,
    and every rank raises its verdict, so that none is left waiting for a rank 0 that stopped."""
    error = None
    if ranks.is_main:
        try:
            check_output_dir(save_dir)
        except OutputError as err:
            error = str(err)
    error = ranks.first_error(error)
    if error:
        raise OutputError(error)


def load_mnist_in_turns(args, img_size, channels, ranks):
    """MNIST, read so that no two processes download into the same folder at once: rank 0
    first, then the first process of each other machine (it downloads only where --data_dir
    is not shared between machines), then all the others. A failure anywhere stops every rank."""
    data = None
    for my_turn, download in ((ranks.is_main, True), (ranks.local_rank == 0, True), (True, False)):
        error = None
        if my_turn and data is None:
            try:
                data = load_training_set(args.data_dir, img_size, channels, args.subset, download=download)
            except DataError as err:
                error = str(err)
        error = ranks.first_error(error)
        if error:
            raise DataError(error)
    return data


def refuse_other_batches_mid_epoch(args, resume, world_size):
    """A run stopped in the middle of an epoch continues with that epoch's remaining batches,
    so whatever would cut the epoch differently (batch size, subset, seed, world size) must
    stay as it was."""
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


# ----------------------------------------------------------------------------------------
# Stopping cleanly, and what a run leaves behind


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

    def on_every_rank(self, ranks, step, device):
        """Whether to stop after `step`, the same answer on every rank, so that one rank's
        signal stops them all at the same step. Ranks compare notes every LOG_EVERY steps
        only, since reading the answer back syncs host and GPU."""
        if ranks.world_size == 1:
            return self.requested
        return step % LOG_EVERY == 0 and ranks.any(self.requested, device)

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class MetricsLog:
    """<save_dir>/metrics.csv, written as the run goes: a row every LOG_EVERY steps, at the
    end of every epoch and where the run stops, each averaging the steps since the last row.

    A resumed run appends to the file of the run it continues. Rows past the checkpoint's
    step (written before a crash, by steps the resumed run takes again) are dropped first, so
    that the steps have neither gaps nor duplicates."""

    COLUMNS = ("step", "epoch", "loss", "lr", "img_per_s", "elapsed_s")

    def __init__(self, path, resume_step=None):
        self.path = path
        rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, **row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow(row)


def save_preview(ema_model, scheduler, path, device, amp_dtype, autoguidance=None):
    """A grid of samples from the EMA weights, drawn with the sampler that is faithful to a
    weakly trained model (sampling.PREVIEW_SAMPLER): for a conditional model one row per
    class, guided at the default scale; otherwise 4 x 4 samples, autoguided as infer.py draws
    them once the run holds a guide, autoguidance = (guide, scale, min_snr) (the run's), else
    the model alone."""
    if ema_model.num_classes:
        labels, nrow = torch.arange(ema_model.num_classes).repeat_interleave(8), 8
    else:
        labels, nrow = None, 4
    guide, scale, min_snr = autoguidance or (None, DEFAULT_GUIDANCE_SCALE, DEFAULT_AUTOGUIDANCE_MIN_SNR)
    images = generate_images(ema_model, scheduler, nrow * nrow if labels is None else len(labels),
                             labels=labels, guide=guide, guidance_scale=scale,
                             guidance_min_snr=min_snr, sampler=PREVIEW_SAMPLER,
                             steps=min(PREVIEW_STEPS, scheduler.num_timesteps), seed=0, device=device,
                             amp_dtype=amp_dtype)
    save_grid(images, path, nrow=nrow)


def wrap_for_training(model, compile_model, ranks, device):
    """(the model that runs the full batches, the one that runs an epoch's last, smaller batch):
    DDP's wrapper under several processes, then torch.compile's over it with --compile."""
    train_model = model
    if ranks.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    eager_model = train_model  # the same parameters
    if compile_model:
        # Static shapes: a symbolic batch size would make every step's graph slower. The last,
        # smaller batch of an epoch runs eagerly instead of compiling a second graph for one
        # step (about 55 s on 2 AVX2 cores, 30 s on 2 AMX cores).
        train_model = torch.compile(train_model, dynamic=False)
    return train_model, eager_model


# ----------------------------------------------------------------------------------------
# Resuming exactly


def training_state(model, ema, optimizer, grad_scaler, scheduler, args, ranks, device, **position):
    """The checkpoint dict (checkpoint.py lists its keys): everything a resumed run needs to
    continue as if it had never stopped. `position`: epoch, step, batch_in_epoch, elapsed_s."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)  # the training GPU's, not the current one's
    return {
        "kind": model.kind, "model_config": dict(model.config), "scheduler_config": scheduler.config,
        "model": clean_state_dict(model.state_dict()), "ema": clean_state_dict(ema.state_dict()),
        "ema_updates": ema.num_updates, "optimizer": optimizer.state_dict(),
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        **position, "world_size": ranks.world_size, "rng": rng, "args": vars(args),
    }


def restore_training_state(resume, model, ema, optimizer, grad_scaler):
    """Load a checkpoint's weights, EMA, optimizer and (fp16) grad-scaler state; returns where
    it stopped: (epoch, step, batch_in_epoch, elapsed_s)."""
    model.load_state_dict(clean_state_dict(resume["model"]))
    ema.load_state_dict(clean_state_dict(resume["ema"]), resume["ema_updates"])
    # load_state_dict also brings back the saved groups' hyperparameters: keep this run's
    # (its --adam_beta2 given again), take only the moments and step counts
    hyperparameters = [{key: value for key, value in group.items() if key != "params"}
                       for group in optimizer.param_groups]
    optimizer.load_state_dict(resume["optimizer"])
    for group, own in zip(optimizer.param_groups, hyperparameters):
        group.update(own)
    if grad_scaler is not None and resume.get("grad_scaler"):
        grad_scaler.load_state_dict(resume["grad_scaler"])
    return resume["epoch"], resume["step"], resume["batch_in_epoch"], resume.get("elapsed_s", 0.0)


def seed_random_stream(resume, seed, ranks, step, device):
    """Noise, timesteps and label dropout draw from torch's global generator: a different
    stream on each rank. One process resuming continues the very stream it was saved with,
    so that the resumed run repeats the uninterrupted one exactly."""
    if resume is not None and ranks.world_size == 1:
        torch.set_rng_state(resume["rng"]["cpu"])
        if "cuda" in resume["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
    else:
        torch.manual_seed(seed + ranks.rank + ranks.world_size * step)


# ----------------------------------------------------------------------------------------
# The run


def train(run, ranks=Ranks(), device=None):
    """Train run.model_class on MNIST as run.args say; returns the last checkpoint's path."""
    args = run.args
    log = print if ranks.is_main else (lambda *a, **k: None)

    # --- setup: device, model, data, optimizer; the state of the run to continue --------
    device = device or resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    amp_dtype = AMP_DTYPES[precision]
    stop_every_rank_unless_writable(args.save_dir, ranks)
    if run.resume is not None:
        refuse_other_batches_mid_epoch(args, run.resume, ranks.world_size)
    if args.importance_sampling and not has_loss_weights(args.loss_weighting, args.min_snr_gamma):
        raise UsageError("--importance_sampling draws timesteps by their loss weights: "
                         "it needs --loss_weighting p2 or --min_snr_gamma above 0")
    guide_epoch = getattr(args, "guide_epoch", None) or None  # model A's option; 0: no guide
    if guide_epoch is not None and guide_epoch >= args.epochs:
        raise UsageError(f"--guide_epoch {guide_epoch} must be less than --epochs {args.epochs}: "
                         "the guide is the model of an earlier epoch")
    guide_power = getattr(args, "guide_ema_power", None)  # model A's options, both about the guide
    for option, what in (("guide_ema_power", "how the guide of --guide_epoch is averaged"),
                         ("guidance_scale", "the scale sampling uses with the guide of --guide_epoch"),
                         ("guidance_min_snr", "where sampling starts to use the guide of --guide_epoch")):
        if getattr(args, option, None) is not None and guide_epoch is None:
            raise UsageError(f"--{option} sets {what}, but this run keeps no guide: give --guide_epoch K "
                             f"above 0 (none given: {DEFAULT_GUIDE_EPOCH} where --epochs is above {DEFAULT_GUIDE_EPOCH})")
    guide_scale, guide_min_snr = run_autoguidance(vars(args))  # the previews draw as infer.py will
    if guide_min_snr > DEFAULT_AUTOGUIDANCE_MAX_SNR:
        raise UsageError(f"--guidance_min_snr {guide_min_snr:g} is above the SNR {DEFAULT_AUTOGUIDANCE_MAX_SNR:g} "
                         "where sampling stops guiding: no step would be guided")
    grow_epoch = getattr(args, "grow_epoch", None)  # model A's option
    if grow_epoch and (grow_epoch >= args.epochs or args.depth % 2):
        raise UsageError(f"--grow_epoch {grow_epoch} stacks --depth / 2 blocks into --depth: it needs an even "
                         f"--depth (not {args.depth}) and must be less than --epochs {args.epochs}")

    # tiny gradients late in training become float32 subnormals, which x86 CPUs process
    # up to ~10x slower; flushing them to zero costs nothing in accuracy
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = run.model_class(**run.model_config).to(device)
    scheduler = NoiseScheduler(**run.scheduler_config, device=device)

    images, labels = load_mnist_in_turns(args, model.img_size, model.channels, ranks)
    if device.type == "cuda" and args.num_workers == 0:
        images, labels = images.to(device), labels.to(device)  # the whole set lives on the GPU
    loader = make_loader(images, labels, args.batch_size, args.seed, ranks.rank, ranks.world_size,
                         args.num_workers, pin_memory=device.type == "cuda" and args.num_workers > 0)
    steps_per_epoch = len(loader)

    optimizer = make_optimizer(model, args.lr, device, args.adam_beta2)
    grad_scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ema = EMA(model, args.ema_decay)
    epoch, step, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    guide = None  # autoguidance's weak model: a frozen copy of an average at the end of epoch guide_epoch
    if run.resume is not None:
        epoch, step, batch_in_epoch, elapsed_before = restore_training_state(
            run.resume, model, ema, optimizer, grad_scaler)
        guide = build_guide(run.resume, device)  # None where the run holds none yet
        if guide_epoch is not None and guide is None and epoch >= guide_epoch:
            raise UsageError(f"{args.resume} is past epoch {guide_epoch} and holds no guide: "
                             "resume without --guide_epoch, or start a new run")
        log(f"resumed from {args.resume} at epoch {epoch}, step {step}")
    guide_average = None  # --guide_ema_power's average: the guide in the making, until epoch guide_epoch ends
    if guide_power is not None and guide is None:
        guide_average = PowerEMA(model, guide_power)
        if run.resume is not None:
            if "guide_average" not in run.resume:
                raise UsageError(f"{args.resume} holds no power average for the guide: resume without "
                                 "--guide_ema_power, or start a new run")
            # updated with the EMA after every step, so its count is the EMA's
            guide_average.load_state_dict(clean_state_dict(run.resume["guide_average"]),
                                          run.resume["ema_updates"])
    seed_random_stream(run.resume, args.seed, ranks, step, device)

    train_model, eager_model = wrap_for_training(model, args.compile, ranks, device)

    metrics = None
    if ranks.is_main:
        os.makedirs(args.save_dir, exist_ok=True)
        metrics = MetricsLog(os.path.join(args.save_dir, "metrics.csv"),
                             resume_step=step if run.resume is not None else None)
        write_options_file(args, run.parser, os.path.join(args.save_dir, "options.args"))

    def save(name, preview_name=None):
        """Rank 0 writes; a failure stops every rank with its one-line reason."""
        path, error = os.path.join(args.save_dir, name), None
        if ranks.is_main:
            state = training_state(model, ema, optimizer, grad_scaler, scheduler, args, ranks, device,
                                   epoch=epoch, step=step, batch_in_epoch=batch_in_epoch, elapsed_s=elapsed())
            if guide_average is not None:
                state["guide_average"] = clean_state_dict(guide_average.state_dict())
            if guide is not None:
                state["guide"] = clean_state_dict(guide.state_dict())
                state["guide_config"] = dict(guide.config)  # shallower than the model's with --grow_epoch
            try:
                save_checkpoint(state, path)
                if preview_name:
                    save_preview(ema.module, scheduler, os.path.join(args.save_dir, preview_name),
                                 device, amp_dtype, None if guide is None else (guide, guide_scale, guide_min_snr))
            except OSError as err:
                error = f"could not write {path} or its preview: {err.strerror or err}"
        error = ranks.first_error(error)
        if error:
            raise OutputError(error)
        log(f"saved {path}")

    start = time.perf_counter()

    def elapsed():
        return elapsed_before + time.perf_counter() - start

    def reached_max_steps():
        return args.max_steps is not None and step >= args.max_steps

    # --- the loop: lr, diffusion loss, optimizer step, EMA, log; a checkpoint per save_freq epochs
    stop = StopFlag(announce=ranks.is_main)  # from here on Ctrl-C saves a resumable checkpoint
    stopped = False
    log(f"training {MODEL_NAMES[model.kind]}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{len(images)} images, {device}, {precision}, world size {ranks.world_size}, "
        f"global batch {args.batch_size * ranks.world_size}")
    try:
        while epoch < args.epochs and not reached_max_steps():
            loader.sampler.sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
            model.train()
            epoch_loss, epoch_steps = torch.zeros((), device=device), 0
            row_loss, row_steps, row_start = torch.zeros((), device=device), 0, time.perf_counter()
            bar = tqdm(itertools.islice(loader, batch_in_epoch, None), total=steps_per_epoch,
                       initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not ranks.is_main, dynamic_ncols=True, leave=False)
            for images_u8, batch_labels in bar:
                lr = learning_rate(args, step, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x0 = to_model_range(images_u8, device)
                y = batch_labels.to(device, non_blocking=True) if model.num_classes else None
                step_model = train_model if len(x0) == args.batch_size else eager_model
                loss = training_step(step_model, scheduler, optimizer, x0, y, amp_dtype=amp_dtype,
                                     grad_scaler=grad_scaler, grad_clip=args.grad_clip,
                                     loss_weighting=args.loss_weighting, min_snr_gamma=args.min_snr_gamma,
                                     importance_sampling=args.importance_sampling)
                ema.update(model)
                if guide_average is not None:
                    guide_average.update(model)
                step, batch_in_epoch = step + 1, batch_in_epoch + 1
                row_loss, row_steps = row_loss + loss, row_steps + 1
                epoch_loss, epoch_steps = epoch_loss + loss, epoch_steps + 1

                stopped = stop.on_every_rank(ranks, step, device)
                end_of_epoch = batch_in_epoch == steps_per_epoch
                if step % LOG_EVERY == 0 or end_of_epoch or stopped or reached_max_steps():
                    mean_loss = ranks.mean(row_loss).item() / row_steps  # syncs: only now and then
                    img_per_s = row_steps * args.batch_size * ranks.world_size / (time.perf_counter() - row_start)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_per_s:.0f}")
                    if metrics:
                        metrics.write(step=step, epoch=f"{epoch + batch_in_epoch / steps_per_epoch:.4f}",
                                      loss=f"{mean_loss:.6f}", lr=f"{lr:.6g}", img_per_s=f"{img_per_s:.1f}",
                                      elapsed_s=f"{elapsed():.1f}")
                    row_loss, row_steps, row_start = torch.zeros((), device=device), 0, time.perf_counter()
                if stopped or reached_max_steps():
                    break
            bar.close()
            if stopped:
                break
            if batch_in_epoch == steps_per_epoch:
                if epoch_steps:  # none when resuming from a stop at the epoch's very end
                    log(f"epoch {epoch + 1}/{args.epochs}  step {step}  "
                        f"loss {ranks.mean(epoch_loss).item() / epoch_steps:.4f}  lr {lr:.2e}  {elapsed():.0f} s")
                epoch, batch_in_epoch = epoch + 1, 0
                if epoch == guide_epoch:
                    if guide_average is None:
                        guide, kept = copy.deepcopy(ema.module), "EMA weights"
                    else:  # the average ends here: its module becomes the guide, no copy needed
                        guide, guide_average, kept = guide_average.module, None, "power-function average"
                    log(f"kept the {kept} of epoch {epoch} as the guide")
                if grow_epoch and epoch == grow_epoch:
                    model, ema, optimizer, guide_average = grow_by_stacking(model, ema, optimizer, device,
                                                                            guide_average)
                    train_model, eager_model = wrap_for_training(model, args.compile, ranks, device)
                    log(f"stacked {model.config['depth'] // 2} blocks into {model.config['depth']}: "
                        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
                if epoch % args.save_freq == 0 and epoch < args.epochs:
                    save(f"ckpt_epoch_{epoch}.pt", f"preview_epoch_{epoch}.png")
    finally:
        stop.restore()

    # --- save: the final checkpoint and preview, or a resumable one when stopped ---------
    if stopped:
        save("ckpt_interrupted.pt")
        log(f"stopped at epoch {epoch}, step {step}; continue with "
            f"--resume {os.path.join(args.save_dir, 'ckpt_interrupted.pt')} "
            "(the other options are read from the checkpoint)")
        return os.path.join(args.save_dir, "ckpt_interrupted.pt")
    save("ckpt_final.pt", "preview_final.png")
    return os.path.join(args.save_dir, "ckpt_final.pt")
