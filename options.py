"""Command-line building blocks: the parser with recipe files, option types, devices, precision.

Nothing here imports the project's other modules, so every layer (the training loop as
well as the scripts) can use it.
"""
import argparse
import math

import torch


class UsageError(ValueError):
    """Options that do not fit together (found after parsing, e.g. once a checkpoint is read)."""


class DeviceError(ValueError):
    """A --device this machine does not have."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to each option's help, except where there is nothing to show
    (None: the help says what happens; False: a flag that is off)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with recipe files (`python train.py @configs/x.args --lr 1e-3`), the defaults
    shown in --help, and a bad option reported in one line.

    A recipe line holds one option and its value ("--lr 1e-3"); "#" starts a comment.
    Later flags on the command line override the recipe's."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars="@", formatter_class=_HelpFormatter, **kwargs)

    def convert_arg_line_to_args(self, arg_line):
        return arg_line.split("#", 1)[0].split()

    def error(self, message):
        """argparse would print the whole usage block (dozens of options for the training
        scripts) above the message."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------
# Option types


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


def nonnegative_float_or_none(text):
    """A number >= 0, or none: the option's own choice, also where a recipe file set a number."""
    if text.lower() == "none":
        return None
    try:
        return nonnegative_float(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 or none, got {text}") from None


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def decay_below_one(text):
    """A moving average's decay: 1 would never move (AdamW refuses it)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def snr_bound(text):
    """A signal-to-noise ratio bound: a number >= 0, or inf (no bound)."""
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or inf, got {text}")
    return value


def guidance_list(text):
    """'0,1,2,3,5' -> [0.0, 1.0, 2.0, 3.0, 5.0] (an argparse type)."""
    try:
        return [nonnegative_float(s) for s in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):  # not a number, or not a finite one >= 0
        raise argparse.ArgumentTypeError(
            f"expected comma-separated scales >= 0 such as 0,1,2,3,5, got {text!r}") from None


# ----------------------------------------------------------------------------------------
# Devices and precision


def add_device_arg(parser):
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 or mps; none given: cuda if available, else mps, else cpu")


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


PRECISIONS = ("bf16", "fp16", "fp32")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cpu_has_fast_bf16():
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16).

    Without it bf16 matmuls are emulated and run far slower than fp32 (docs/performance.md),
    so bf16 autocast must not be the default there. The flags are read from /proc/cpuinfo
    (Linux); elsewhere we assume no.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_precision(device):
    """The fastest precision the hardware runs natively:
    CUDA: bf16 from compute capability 8.0 (Ampere) on; fp16 on 7.x (Volta, Turing: tensor
          cores for fp16 only; torch.cuda.is_bf16_supported() says yes there too, but emulates);
          fp32 below.
    CPU:  bf16 with AMX or AVX512-BF16, else fp32 (CPUs have no fast fp16 matmul).
    MPS:  fp32.
    """
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16" if major == 7 else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def resolve_precision(precision, device):
    """--precision, or the device's default when it is None -> "bf16", "fp16" or "fp32"."""
    return default_precision(device) if precision is None else precision


def autocast_dtype(precision, device):
    """The autocast dtype of --precision (weights stay fp32): torch.bfloat16, torch.float16,
    or None for plain fp32."""
    return AMP_DTYPES[resolve_precision(precision, device)]


def add_precision_arg(parser):
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="autocast dtype, weights stay fp32 (fp16 training adds a gradient "
                             "scaler); none given: bf16 on CUDA GPUs of compute capability >= 8.0 "
                             "and on CPUs with AMX or AVX512-BF16, fp16 on CUDA 7.x, else fp32")
