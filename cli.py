"""What the scripts share on top of the library: sampling options, loading a checkpoint to
sample from, and `run_main` (malloc keeping freed memory, one-line errors). (Option types,
devices and precision: options.py.)"""
import ctypes
import os
import sys

from checkpoint import CheckpointError, build_guide, load_model
from data import DataError
from dit import ModelConfigError
from images import OutputError, check_output
from options import (DeviceError, UsageError, add_device_arg, add_precision_arg, autocast_dtype,
                     nonnegative_float, positive_int, resolve_device, snr_bound)
from sampling import (DEFAULT_AUTOGUIDANCE_MAX_SNR, DEFAULT_AUTOGUIDANCE_MIN_SNR, DEFAULT_SAMPLER, DEFAULT_STEPS,
                      SAMPLERS, VARIANCES, default_steps, run_autoguidance)
from scheduler import ScheduleError

# the default weights of infer.py and infer_cfg.py, trained by the CPU recipes (pretrained/README.md)
PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
PRETRAINED_A = os.path.join(PRETRAINED, "model_a.pt")
PRETRAINED_B = os.path.join(PRETRAINED, "model_b.pt")


def add_sampler_args(parser):
    """--sampler and --steps (infer.py, infer_cfg.py, evaluate.py, figures.py)."""
    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                        help="ddpm: ancestral sampling (stochastic); ddim; dpm++2m: DPM-Solver++(2M)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="denoising steps; none given: all T for ddpm, "
                             f"{DEFAULT_STEPS['ddim']} for ddim, {DEFAULT_STEPS['dpm++2m']} for dpm++2m")


def add_eta_arg(parser):
    """--eta of the ddim sampler (infer.py, infer_cfg.py, evaluate.py)."""
    parser.add_argument("--eta", type=nonnegative_float, default=0.0,
                        help="DDIM noise: 0 deterministic, 1 ancestral (ddim only)")


def add_variance_arg(parser):
    """--variance of the ddpm sampler (infer.py, infer_cfg.py, evaluate.py)."""
    parser.add_argument("--variance", choices=VARIANCES, default=None,
                        help="ddpm only: the noise of each step, beta' (beta) or the respaced chain's "
                             "posterior variance (posterior); none given: beta for all T steps, "
                             "posterior for fewer")


def check_sampler_options(args):
    """--eta and --variance belong to one sampler each."""
    if getattr(args, "eta", 0) and args.sampler != "ddim":
        raise UsageError("--eta is a DDIM option (use --sampler ddim)")
    if args.variance is not None and args.sampler != "ddpm":
        raise UsageError("--variance is a DDPM option (use --sampler ddpm)")


def add_guidance_interval_args(parser):
    """--guidance_max_snr and --guidance_min_snr: where model A's autoguidance acts (infer.py,
    evaluate.py)."""
    parser.add_argument("--guidance_max_snr", type=snr_bound, default=None, metavar="S",
                        help="model A: autoguide only the steps whose signal-to-noise ratio "
                             "ab_t / (1 - ab_t) is at most S, the model alone on the cleaner ones "
                             "(a guidance interval); inf guides every step; none given: "
                             f"{DEFAULT_AUTOGUIDANCE_MAX_SNR:g}")
    parser.add_argument("--guidance_min_snr", type=snr_bound, default=None, metavar="S",
                        help="model A: autoguide only the steps whose signal-to-noise ratio is at "
                             "least S, the model alone on the noisier ones, where the digit's class "
                             "is settled; 0 guides them; none given: the checkpoint's (train.py "
                             f"--guidance_min_snr), else {DEFAULT_AUTOGUIDANCE_MIN_SNR:g}")


def resolve_autoguidance(args, ckpt):
    """(scale, min_snr, max_snr) of model A's autoguidance: each option given, else the run's
    choice (train.py, in the checkpoint's options), else the default. An interval that guides
    no step is a UsageError."""
    scale, min_snr = run_autoguidance(ckpt.get("args", {}))
    if args.guidance_scale is not None:
        scale = args.guidance_scale
    if args.guidance_min_snr is not None:
        min_snr = args.guidance_min_snr
    max_snr = DEFAULT_AUTOGUIDANCE_MAX_SNR if args.guidance_max_snr is None else args.guidance_max_snr
    if min_snr > max_snr:
        raise UsageError(f"no step would be guided: the lower SNR bound {min_snr:g} (--guidance_min_snr, "
                         f"else the checkpoint's) is above the upper one {max_snr:g} (--guidance_max_snr)")
    return scale, min_snr, max_snr


def add_sampling_args(parser, default_ckpt):
    """The options of infer.py and infer_cfg.py."""
    parser.add_argument("--ckpt", default=default_ckpt,
                        help="checkpoint written by the training script, or shipped weights")
    parser.add_argument("--output", required=True,
                        help="image file (format from its extension; a grid when there are "
                             "several samples), or a directory (existing, or ending in /) that "
                             "receives one PNG per sample")
    parser.add_argument("--num_samples", type=positive_int, default=1, help="images to draw")
    parser.add_argument("--scale", type=positive_int, default=1,
                        help="magnify the picture, each pixel a scale x scale block (3 makes a "
                             "28-pixel digit easy to see); files in an --output folder keep the model's size")
    add_sampler_args(parser)
    add_eta_arg(parser)
    add_variance_arg(parser)
    parser.add_argument("--seed", type=int, default=0, help="the same seed draws the same images")
    parser.add_argument("--batch_size", type=positive_int, default=256,
                        help="samples denoised at once (memory bound)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights, not the EMA")
    add_precision_arg(parser)
    add_device_arg(parser)


def load_for_sampling(args, expected_kind):
    """Check --output, pick the device and load the checkpoint's EMA (or raw) weights:
    the common start of infer.py and infer_cfg.py. Returns (model, scheduler, ckpt, device)."""
    check_output(args.output)
    device = resolve_device(args.device)
    model, scheduler, ckpt = load_model(args.ckpt, device, use_ema=not args.no_ema,
                                        expected_kind=expected_kind)
    return model, scheduler, ckpt, device


def load_guide(ckpt, args, device):
    """Model A's autoguidance network from its loaded checkpoint, or None when it has none,
    in which case an option that asks for guidance is a UsageError: a scale other than 1
    (--guidance_scale, or in evaluate.py --guidance_sweep) or a guidance interval. Scale 1 is
    the model alone, which a checkpoint without a guide draws as it is, so that one command
    can score every checkpoint of a run, those before its guide epoch included."""
    guide = build_guide(ckpt, device)
    scales = [args.guidance_scale, *(getattr(args, "guidance_sweep", None) or [])]
    asks_for_guidance = (any(scale is not None and scale != 1 for scale in scales)
                         or args.guidance_max_snr is not None or args.guidance_min_snr is not None)
    if guide is None and asks_for_guidance:
        raise UsageError(f"{args.ckpt} holds model A without a guide, so there is nothing to guide with: "
                         "train it with --guide_epoch K for autoguidance")
    return guide


def resolve_steps(steps, sampler, scheduler):
    """--steps checked against the checkpoint's T, or the sampler's default when it is None:
    the number of model calls that will actually run (scripts report it)."""
    if steps is not None and steps > scheduler.num_timesteps:
        raise UsageError(f"--steps {steps} is more than the {scheduler.num_timesteps} "
                         "timesteps this model was trained with")
    return default_steps(sampler, scheduler.num_timesteps) if steps is None else steps


def sampling_kwargs(args, scheduler, device):
    """Checked keyword arguments for sampling.generate_images from add_sampling_args' options."""
    steps = resolve_steps(args.steps, args.sampler, scheduler)
    check_sampler_options(args)
    return dict(sampler=args.sampler, steps=steps, eta=args.eta, variance=args.variance, seed=args.seed,
                batch_size=args.batch_size, amp_dtype=autocast_dtype(args.precision, device),
                progress=True)


# the failures a user can cause and mend (bad input, missing data, a bad checkpoint)
EXPECTED_ERRORS = (CheckpointError, DataError, DeviceError, OutputError, UsageError, ModelConfigError,
                   ScheduleError)


def keep_freed_memory():
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse; True where it took.

    By default glibc serves blocks above its mmap threshold (128 KiB at first, raised as such
    blocks are freed) straight from the kernel and returns them on free, and trims the heap
    whenever more than twice that threshold lies free at its top. A step on the CPU allocates
    and frees megabytes of activations, so step after step the same pages were faulted in
    afresh: on 2 Zen 5 EPYC cores the loop of model A's 49-token network (4x4-pixel
    patches, width 128) runs 922-1,040 img/s with this against 776-815 without, to bit-identical
    weights (docs/performance.md). The pages stay with the process. A no-op (False) outside glibc.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not Linux with glibc
        return False


def run_main(main):
    """Run a script's main() with malloc keeping freed memory (keep_freed_memory); an expected
    failure ends with a one-line `error: ...` instead of a traceback."""
    keep_freed_memory()
    try:
        main()
    except EXPECTED_ERRORS as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (which saves and returns)
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # the shell's status for SIGINT
