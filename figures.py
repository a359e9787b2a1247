"""Pictures of what a checkpoint does: a guidance sweep and a denoising trajectory.

    python figures.py --ckpt checkpoints/cfg_cpu/ckpt_final.pt --outdir assets/

writes into --outdir:
  guidance_sweep.png  (model B only) rows = digits 0-9, columns = guidance scales; every
                      column starts from the same noise, so only the scale differs
  trajectory.png      for a few samples, two rows each: x_t (top) and the model's
                      prediction of the clean image x0_hat (bottom) at several t, T-1 -> 0
"""
import os

import torch

from checkpoint import load_model
from cli import (ArgumentParser, add_device_arg, add_precision_arg, add_sampler_args, autocast_dtype,
                 guidance_list, positive_int, resolve_device, resolve_steps, run_main)
from dit_cfg import ConditionalDiT
from images import check_output_dir, save_grid
from sampling import DEFAULT_GUIDANCE_SCALE, generate_images, guided_noise_fn, sample, timestep_schedule


def guidance_sweep(model, scheduler, scales, sampler, steps, seed, device, amp_dtype=None):
    """(10 * len(scales), C, H, W), ordered row by row: digit 0 at every scale, digit 1, ..."""
    labels = torch.arange(model.num_classes)
    columns = [generate_images(model, scheduler, len(labels), labels=labels, guidance_scale=s, sampler=sampler,
                               steps=steps, seed=seed, device=device, amp_dtype=amp_dtype) for s in scales]
    return torch.stack(columns, dim=1).flatten(0, 1)  # (10, S, C, H, W) -> rows of digits


def trajectory(model, scheduler, num_samples, columns, sampler, steps, seed, device, amp_dtype=None):
    """(2 * num_samples * columns, C, H, W): per sample a row of x_t and a row of x0_hat.

    columns >= 2: the first column is t = T-1 and the last t = 0."""
    visited = timestep_schedule(scheduler.num_timesteps, steps)
    shown = [visited[round(i * (len(visited) - 1) / (columns - 1))] for i in range(columns)]
    if isinstance(model, ConditionalDiT):
        labels = torch.arange(num_samples, device=device) % model.num_classes
        model_fn = guided_noise_fn(model, labels, DEFAULT_GUIDANCE_SCALE)
    else:
        model_fn = model
    generator = torch.Generator(device).manual_seed(seed)
    shape = (num_samples, model.channels, model.img_size, model.img_size)
    with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
        _, steps_seen = sample(model_fn, scheduler, shape, sampler=sampler, steps=steps,
                               generator=generator, device=device, trajectory_at=shown)
    x_t = torch.stack([x for _, x, _ in steps_seen], dim=1)   # (N, columns, C, H, W)
    x0_hat = torch.stack([x0 for _, _, x0 in steps_seen], dim=1)
    return torch.stack([x_t, x0_hat], dim=1).flatten(0, 2).cpu(), [t for t, _, _ in steps_seen]


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--outdir", default="assets")
    parser.add_argument("--scales", type=guidance_list, default=[0.0, 1.0, 2.0, 3.0, 5.0],
                        help="guidance scales of the sweep (default: 0,1,2,3,5)")
    parser.add_argument("--trajectory_samples", type=positive_int, default=4)
    parser.add_argument("--trajectory_columns", type=positive_int, default=8,
                        help="timesteps shown, from T-1 to 0 (at least 2)")
    add_sampler_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights, not the EMA")
    add_precision_arg(parser)
    add_device_arg(parser)
    args = parser.parse_args(argv)
    if args.trajectory_columns < 2:
        parser.error("--trajectory_columns must be at least 2: the trajectory runs from t = T-1 to t = 0")
    check_output_dir(args.outdir)
    device = resolve_device(args.device)
    model, scheduler, _ = load_model(args.ckpt, device, use_ema=not args.no_ema)
    steps = resolve_steps(args.steps, args.sampler, scheduler)
    amp_dtype = autocast_dtype(args.precision, device)

    if isinstance(model, ConditionalDiT):
        images = guidance_sweep(model, scheduler, args.scales, args.sampler, steps, args.seed, device,
                                amp_dtype)
        path = os.path.join(args.outdir, "guidance_sweep.png")
        save_grid(images, path, nrow=len(args.scales))
        print(f"wrote {path}: rows = digits 0-9, columns = guidance scales {args.scales}")

    images, shown = trajectory(model, scheduler, args.trajectory_samples, args.trajectory_columns,
                               args.sampler, steps, args.seed, device, amp_dtype)
    path = os.path.join(args.outdir, "trajectory.png")
    save_grid(images, path, nrow=len(shown))
    print(f"wrote {path}: columns t = {shown}; per sample, x_t above and x0_hat below")


if __name__ == "__main__":
    run_main(main)
