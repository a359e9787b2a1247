"""Command-line plumbing shared by every script: recipe files, option types, devices, errors."""
import argparse
import math
import sys

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse with recipe files: `python train.py @configs/x.args --lr 1e-3`.

    A recipe line holds one option and its value ("--lr 1e-3"); "#" starts a comment.
    Later flags on the command line override the recipe's."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars="@", **kwargs)

    def convert_arg_line_to_args(self, arg_line):
        return arg_line.split("#", 1)[0].split()

    def error(self, message):
        """A bad option ends in one line, as every other bad input does; argparse would print
        the whole usage block (dozens of options for the training scripts) above it."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def nonnegative_float(text):
    value = float(text)
    # float() reads "nan" and "inf" too; neither is a usable scale, rate or bound
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def guidance_list(text):
    """'0,1,2,3,5' -> [0.0, 1.0, 2.0, 3.0, 5.0] (an argparse type)."""
    try:
        return [nonnegative_float(s) for s in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):  # not a number, or not a finite one >= 0
        raise argparse.ArgumentTypeError(
            f"expected comma-separated scales >= 0 such as 0,1,2,3,5, got {text!r}") from None


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_device_arg(parser):
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, mps (default: cuda if available, else mps, else cpu)")


class DeviceError(ValueError):
    pass


def resolve_device(name=None):
    """--device -> torch.device; default cuda, then mps, then cpu."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available on this machine")
    return device


def cpu_has_fast_bf16():
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16).

    Without it bf16 matmuls are emulated and run far slower than fp32 (measured on an
    AVX2-only EPYC: 0.25 vs 64 GFLOP/s), so bf16 autocast must not be the default there.
    The flags are read from /proc/cpuinfo (Linux); elsewhere we assume no.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_precision(device):
    """bf16 where the hardware runs it fast (CUDA with bf16, CPU with AMX/AVX512-BF16), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast_dtype(precision, device):
    """torch.bfloat16 for bf16 autocast (fp32 master weights), None for plain fp32."""
    if precision is None:
        precision = default_precision(device)
    return torch.bfloat16 if precision == "bf16" else None


def add_precision_arg(parser):
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast (weights stay fp32) or plain fp32 (default: bf16 on "
                             "CUDA and on CPUs with AMX or AVX512-BF16, fp32 elsewhere)")


class UsageError(ValueError):
    """Options that do not fit together (found after parsing, e.g. once a checkpoint is read)."""


def add_sampler_args(parser):
    """--sampler and --steps (infer.py, infer_cfg.py, evaluate.py)."""
    from sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                        help=f"default: {DEFAULT_SAMPLER}")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="denoising steps (default: all T for ddpm, "
                             f"{DEFAULT_STEPS['ddim']} for ddim, {DEFAULT_STEPS['dpm++2m']} for dpm++2m)")


def add_sampling_args(parser):
    """The options of infer.py and infer_cfg.py."""
    parser.add_argument("--ckpt", required=True, help="checkpoint written by the training script")
    parser.add_argument("--output", required=True,
                        help="image file (format from its extension; a grid when there are "
                             "several samples), or a directory (existing, or ending in /) that "
                             "receives one PNG per sample")
    parser.add_argument("--num_samples", type=positive_int, default=1)
    add_sampler_args(parser)
    parser.add_argument("--eta", type=nonnegative_float, default=0.0,
                        help="DDIM noise: 0 deterministic, 1 ancestral (ddim only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=positive_int, default=256,
                        help="samples denoised at once (memory bound)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights, not the EMA")
    add_precision_arg(parser)
    add_device_arg(parser)


def load_for_sampling(args, expected_kind):
    """Check --output, pick the device and load the checkpoint's EMA (or raw) weights:
    the common start of infer.py and infer_cfg.py. Returns (model, scheduler, device)."""
    from checkpoint import load_model
    from images import check_output
    check_output(args.output)
    device = resolve_device(args.device)
    model, scheduler, _ = load_model(args.ckpt, device, use_ema=not args.no_ema,
                                     expected_kind=expected_kind)
    return model, scheduler, device


def resolve_steps(steps, sampler, scheduler):
    """--steps checked against the checkpoint's T, or the sampler's default when it is None:
    the number of model calls that will actually run (scripts report it)."""
    from sampling import default_steps
    if steps is not None and steps > scheduler.num_timesteps:
        raise UsageError(f"--steps {steps} is more than the {scheduler.num_timesteps} "
                         "timesteps this model was trained with")
    return default_steps(sampler, scheduler.num_timesteps) if steps is None else steps


def sampling_kwargs(args, scheduler, device):
    """Checked keyword arguments for sampling.generate_images from add_sampling_args' options."""
    steps = resolve_steps(args.steps, args.sampler, scheduler)
    if args.eta and args.sampler != "ddim":
        raise UsageError("--eta is a DDIM option (use --sampler ddim)")
    return dict(sampler=args.sampler, steps=steps, eta=args.eta, seed=args.seed,
                batch_size=args.batch_size, amp_dtype=autocast_dtype(args.precision, device),
                progress=True)


def run_main(main):
    """Run a script's main(); expected failures (bad input, missing data, bad checkpoint)
    end with a one-line `error: ...` instead of a traceback."""
    from checkpoint import CheckpointError
    from data import DataError
    from dit import ModelConfigError
    from images import OutputError
    try:
        main()
    except (CheckpointError, DataError, DeviceError, OutputError, UsageError, ModelConfigError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (which saves and returns)
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # the shell's status for SIGINT
