"""Pictures of a training run: its loss curve, a guidance sweep and the denoising of a few digits.

    python figures.py --metrics checkpoints/cfg_cpu/metrics.csv
    python figures.py --ckpt checkpoints/cfg_cpu/ckpt_final.pt --metrics checkpoints/cfg_cpu/metrics.csv

write into --outdir (figures/ unless told otherwise):
  loss.png            (--metrics) training loss against optimizer step on a log scale: each
                      row of metrics.csv in gray, a centred running mean over them in blue
  guidance_sweep.png  (--ckpt, model B only) rows = digits 0-9, columns = guidance scales;
                      every column starts from the same noise, so only the scale differs
  trajectory.png      (--ckpt) for a few samples, two rows each: x_t (top) and the model's
                      prediction of the clean image x0_hat (bottom) at several t, T-1 -> 0
  denoising.gif       (--ckpt) a few digits in one row, one frame per sampler step: the
                      noise x_T first, then x_t after each step (x_t alone: trajectory.png
                      shows x0_hat), the last frame being the final samples, held longer
The digit pictures are magnified --scale times, each pixel becoming a scale x scale block.
"""
import bisect
import csv
import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont

from checkpoint import build_guide, load_model
from cli import add_sampler_args, resolve_steps, run_main
from dit_cfg import ConditionalDiT
from images import check_output_dir, save_gif, save_grid
from options import (ArgumentParser, UsageError, add_device_arg, add_precision_arg, autocast_dtype,
                     guidance_list, nonnegative_float, positive_int, resolve_device)
from sampling import (DEFAULT_GUIDANCE_SCALE, autoguided_fn, generate_images, guided_noise_fn, run_autoguidance,
                      sample, timestep_schedule)
from training import MetricsLog

METRICS_COLUMNS = MetricsLog.COLUMNS  # what training writes
# The GIF's motion lasts about GIF_MOTION_MS whatever the number of steps, within two bounds
# per frame: at least 20 ms (browsers show shorter GIF delays as 100 ms) and at most 200 ms
# (so that a few steps do not crawl). The final samples stay on screen for GIF_LAST_MS
# before the loop starts again.
GIF_MOTION_MS = 2500
GIF_LAST_MS = 2000


class MetricsError(UsageError):
    """A --metrics file that is not a training metrics.csv; the message says why in one line."""


def _metrics_row(fields, path, number):
    """One CSV row (a list of strings) -> (step, loss); MetricsError naming the line otherwise."""
    if len(fields) != len(METRICS_COLUMNS):
        raise MetricsError(f"{path} line {number}: expected {len(METRICS_COLUMNS)} comma-separated "
                           f"values ({','.join(METRICS_COLUMNS)}), got {len(fields)}")
    values = {}
    for name, text in zip(METRICS_COLUMNS, fields):
        try:
            values[name] = int(text) if name == "step" else float(text)
        except ValueError:
            kind = "an integer" if name == "step" else "a number"
            raise MetricsError(f"{path} line {number}: {name} should be {kind}, got {text!r}") from None
    if values["step"] < 0:
        raise MetricsError(f"{path} line {number}: step {values['step']} is negative")
    if not (math.isfinite(values["loss"]) and values["loss"] > 0):
        raise MetricsError(f"{path} line {number}: loss {fields[2]} cannot be drawn on a log scale "
                           "(it must be a finite number > 0)")
    return values["step"], values["loss"]


def read_metrics(path):
    """Training's metrics.csv -> (steps, losses), two lists with one entry per row kept, the
    steps strictly increasing.

    A resumed run appends to the file. When a row's step is not past the row before it, the
    run was resumed from a checkpoint older than the rows already written (it stopped between
    two checkpoints), so the rows from that step on are dropped: the resumed run wrote them
    again. A last line without its newline that does not parse is a row still being written
    by a running training, and is left out."""
    try:
        with open(path, newline="") as f:
            text = f.read()
    except OSError as err:
        raise MetricsError(f"cannot read the metrics file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise MetricsError(f"{path} is not a text file, expected a training metrics.csv") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or rows[0] != list(METRICS_COLUMNS):
        raise MetricsError(f"{path} is not a training metrics.csv: its first line should be "
                           f"{','.join(METRICS_COLUMNS)}")
    steps, losses = [], []
    for number, fields in enumerate(rows[1:], start=2):
        try:
            step, loss = _metrics_row(fields, path, number)
        except MetricsError:
            if number == len(rows) and not text.endswith("\n"):
                break  # the row training is writing right now
            raise
        while steps and steps[-1] >= step:
            steps.pop()
            losses.pop()
        steps.append(step)
        losses.append(loss)
    if not steps:
        raise MetricsError(f"{path} has no rows yet (training writes one every 10 steps)")
    return steps, losses


def running_mean(steps, losses, window):
    """The mean loss of the rows whose step lies within window / 2 of each row's step (a
    centred window, narrower at the ends), each row weighted by the steps it averages: a
    row's loss is the mean over the steps since the row before it.

    steps: strictly increasing ints; window: in steps, 0 keeps every loss as it is."""
    weights = [step - previous for previous, step in zip([0] + steps[:-1], steps)]
    weights[0] = max(weights[0], 1)  # a first row at step 0 still counts
    weighted_sum, weight_sum = [0.0], [0.0]  # prefix sums: a window's mean in O(1)
    for loss, weight in zip(losses, weights):
        weighted_sum.append(weighted_sum[-1] + loss * weight)
        weight_sum.append(weight_sum[-1] + weight)
    means = []
    for step in steps:
        lo = bisect.bisect_left(steps, step - window / 2)
        hi = bisect.bisect_right(steps, step + window / 2)
        means.append((weighted_sum[hi] - weighted_sum[lo]) / (weight_sum[hi] - weight_sum[lo]))
    return means


def linear_ticks(lo, hi, target=5, min_spacing=0.0):
    """About `target` round values in [lo, hi], 1, 2 or 5 times a power of ten apart (and
    at least min_spacing apart)."""
    wanted = max((hi - lo) / target, min_spacing, 1e-300)
    power = 10.0 ** math.floor(math.log10(wanted))
    spacing = next(m * power for m in (1, 2, 5, 10) if m * power >= wanted * (1 - 1e-9))
    return [k * spacing for k in range(math.ceil(lo / spacing), math.floor(hi / spacing) + 1)]


def log_ticks(lo, hi):
    """Round values in [lo, hi] (0 < lo < hi) for a log axis: the powers of ten when at least
    three fit, else 1, 2 and 5 times them, else (a range under about a factor of 5) linear ticks."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1,), (1, 2, 5)):
        ticks = [m * 10.0 ** e for e in decades for m in mantissas if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 3:
            return ticks
    return linear_ticks(lo, hi)


def step_label(value):
    """1500 -> '1500', 20000 -> '20k', 1500000 -> '1.5M'."""
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    return f"{value / 1e3:g}k" if value >= 1e4 else f"{value:g}"


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow 10.1 and newer)
    except TypeError:
        return ImageFont.load_default()  # older Pillow: the small bitmap font


def _text(draw, xy, text, font, align="left", fill=(0, 0, 0)):
    """Text whose left edge, centre or right edge (align) is at x and whose middle is at y;
    placed by its measured box, as bitmap fonts take no anchor."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - {"left": 0, "center": (right - left) / 2, "right": right - left}[align] - left
    draw.text((x, xy[1] - (top + bottom) / 2), text, font=font, fill=fill)


LOSS_PLOT_SIZE = (960, 540)
LOSS_PLOT_MARGINS = (80, 60, 30, 60)  # left, top, right, bottom: room for labels and title
RAW_COLOR, MEAN_COLOR, GRID_COLOR = (190, 190, 190), (31, 119, 180), (232, 232, 232)


def loss_plot(steps, losses, smooth):
    """A PIL image of the loss against the step (x from 0, y logarithmic): the rows in gray,
    their running mean over smooth * (steps drawn) steps in blue, gridlines at round values."""
    width, height = LOSS_PLOT_SIZE
    left, top, right, bottom = LOSS_PLOT_MARGINS
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # the plot area in pixels
    step_lo, step_hi = 0, max(steps[-1], 1)  # from the run's start, even if its first row is at 0
    window = round(smooth * steps[-1])
    means = running_mean(steps, losses, window)
    loss_lo, loss_hi = min(losses), max(losses)
    pad = max((loss_hi / loss_lo) ** 0.05, 1.05)  # 5% of the log range, some even when flat
    log_lo, log_hi = math.log10(loss_lo / pad), math.log10(loss_hi * pad)

    def px(step, loss):
        x = x0 + (step - step_lo) / (step_hi - step_lo) * (x1 - x0)
        return x, y1 - (math.log10(loss) - log_lo) / (log_hi - log_lo) * (y1 - y0)

    image = Image.new("RGB", LOSS_PLOT_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    for loss in log_ticks(10 ** log_lo, 10 ** log_hi):
        y = px(step_lo, loss)[1]
        draw.line([(x0, y), (x1, y)], fill=GRID_COLOR)
        _text(draw, (x0 - 8, y), f"{loss:g}", small, align="right")
    for step in linear_ticks(step_lo, step_hi, min_spacing=1):
        x = px(step, 10 ** log_lo)[0]
        draw.line([(x, y0), (x, y1)], fill=GRID_COLOR)
        _text(draw, (x, y1 + 14), step_label(step), small, align="center")
    for values, color, line_width in ((losses, RAW_COLOR, 1), (means, MEAN_COLOR, 2)):
        points = [px(step, loss) for step, loss in zip(steps, values)]
        if len(points) == 1:
            draw.ellipse([points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3], fill=color)
        else:
            draw.line(points, fill=color, width=line_width, joint="curve")
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    smoothing = f"running mean over {window} steps" if window > 0 else "no smoothing"
    _text(draw, (x0, top / 2), f"training loss (log scale): gray = each metrics.csv row, blue = {smoothing}; "
                               f"last row {losses[-1]:.4g} at step {steps[-1]}", font)
    _text(draw, ((x0 + x1) / 2, height - bottom / 3), "optimizer step", font, align="center")
    return image


def guidance_sweep(model, scheduler, scales, sampler, steps, seed, device, amp_dtype=None):
    """(10 * len(scales), C, H, W), ordered row by row: digit 0 at every scale, digit 1, ..."""
    labels = torch.arange(model.num_classes)
    columns = [generate_images(model, scheduler, len(labels), labels=labels, guidance_scale=s, sampler=sampler,
                               steps=steps, seed=seed, device=device, amp_dtype=amp_dtype) for s in scales]
    return torch.stack(columns, dim=1).flatten(0, 1)  # (10, S, C, H, W) -> rows of digits


def recorded_sampling(model, scheduler, num_samples, sampler, steps, seed, device, amp_dtype, record_at,
                      autoguidance=None):
    """Sample num_samples images as infer.py and infer_cfg.py draw them (model B: digits 0, 1, ...
    at the default guidance; model A: autoguided as its checkpoint says, autoguidance = (guide,
    scale, min_snr), or alone where that is None) and record the steps at timesteps record_at:
    (final x0 (N, C, H, W), [(t, x_t, x0_hat)])."""
    if isinstance(model, ConditionalDiT):
        labels = torch.arange(num_samples, device=device) % model.num_classes
        model_fn = guided_noise_fn(model, labels, DEFAULT_GUIDANCE_SCALE)
    elif autoguidance is not None:
        guide, scale, min_snr = autoguidance
        model_fn = autoguided_fn(model, guide, scale, scheduler, min_snr=min_snr)
    else:
        model_fn = model
    generator = torch.Generator(device).manual_seed(seed)
    shape = (num_samples, model.channels, model.img_size, model.img_size)
    with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return sample(model_fn, scheduler, shape, sampler=sampler, steps=steps,
                      generator=generator, device=device, trajectory_at=record_at)


def trajectory(model, scheduler, num_samples, columns, sampler, steps, seed, device, amp_dtype=None,
               autoguidance=None):
    """(2 * num_samples * columns, C, H, W): per sample a row of x_t and a row of x0_hat.

    columns >= 2: the first column is t = T-1 and the last t = 0."""
    visited = timestep_schedule(scheduler.num_timesteps, steps)
    shown = [visited[round(i * (len(visited) - 1) / (columns - 1))] for i in range(columns)]
    _, steps_seen = recorded_sampling(model, scheduler, num_samples, sampler, steps, seed, device,
                                      amp_dtype, shown, autoguidance)
    x_t = torch.stack([x for _, x, _ in steps_seen], dim=1)   # (N, columns, C, H, W)
    x0_hat = torch.stack([x0 for _, _, x0 in steps_seen], dim=1)
    return torch.stack([x_t, x0_hat], dim=1).flatten(0, 2).cpu(), [t for t, _, _ in steps_seen]


def denoising_frames(model, scheduler, num_samples, sampler, steps, seed, device, amp_dtype=None,
                     autoguidance=None):
    """steps + 1 batches (N, C, H, W): the noise x_T, then x_t after each sampler step, the
    last being the final samples."""
    final, steps_seen = recorded_sampling(model, scheduler, num_samples, sampler, steps, seed, device,
                                          amp_dtype, timestep_schedule(scheduler.num_timesteps, steps),
                                          autoguidance)
    # each step's input is the previous step's output, so the inputs and the final output
    # make the whole sequence
    return [x.cpu() for _, x, _ in steps_seen] + [final.cpu()]


def build_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default=None,
                        help="a training run's metrics.csv: draw its loss curve (loss.png)")
    parser.add_argument("--ckpt", default=None,
                        help="a checkpoint: draw the guidance sweep (model B), trajectory.png and "
                             "denoising.gif")
    parser.add_argument("--outdir", default="figures", help="folder the pictures are written to")
    parser.add_argument("--smooth", type=nonnegative_float, default=0.02,
                        help="the blue loss curve is the mean over a centred window of this fraction "
                             "of the steps drawn (each row weighted by the steps it covers), so that "
                             "thousands of noisy rows read as one line; 0 draws the rows as they are")
    parser.add_argument("--scale", type=positive_int, default=3,
                        help="magnification of the digit pictures: each pixel becomes a scale x scale "
                             "block (1 keeps the model's size)")
    parser.add_argument("--scales", type=guidance_list, default="0,1,2,3,5",
                        help="guidance scales of the sweep")
    parser.add_argument("--trajectory_samples", type=positive_int, default=4,
                        help="samples in trajectory.png")
    parser.add_argument("--trajectory_columns", type=positive_int, default=8,
                        help="timesteps shown, from T-1 to 0 (at least 2)")
    parser.add_argument("--gif_samples", type=positive_int, default=10,
                        help="digits in denoising.gif (model B: 0, 1, 2, ... at the default guidance; "
                             "model A autoguided as infer.py draws it when it has a guide)")
    add_sampler_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise every picture starts from")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights, not the EMA")
    add_precision_arg(parser)
    add_device_arg(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.metrics is None and args.ckpt is None:
        parser.error("nothing to draw: give --metrics (the loss curve), --ckpt (samples) or both")
    if args.smooth > 1:
        parser.error(f"--smooth is a fraction of the steps drawn, at most 1, got {args.smooth:g}")
    if args.trajectory_columns < 2:
        parser.error("--trajectory_columns must be at least 2: the trajectory runs from t = T-1 to t = 0")
    check_output_dir(args.outdir)
    metrics = read_metrics(args.metrics) if args.metrics is not None else None
    if args.ckpt is not None:
        device = resolve_device(args.device)
        model, scheduler, ckpt = load_model(args.ckpt, device, use_ema=not args.no_ema)
        guide = build_guide(ckpt, device)  # model A's autoguidance network, if it was trained with one
        autoguidance = None if guide is None else (guide, *run_autoguidance(ckpt.get("args", {})))
        steps = resolve_steps(args.steps, args.sampler, scheduler)
        amp_dtype = autocast_dtype(args.precision, device)

    if metrics is not None:
        path = os.path.join(args.outdir, "loss.png")
        os.makedirs(args.outdir, exist_ok=True)
        loss_plot(*metrics, args.smooth).save(path)
        print(f"wrote {path}: loss of {len(metrics[0])} rows, steps {metrics[0][0]}-{metrics[0][-1]}")
    if args.ckpt is None:
        return

    if isinstance(model, ConditionalDiT):
        images = guidance_sweep(model, scheduler, args.scales, args.sampler, steps, args.seed, device,
                                amp_dtype)
        path = os.path.join(args.outdir, "guidance_sweep.png")
        save_grid(images, path, nrow=len(args.scales), scale=args.scale)
        print(f"wrote {path}: rows = digits 0-9, columns = guidance scales {args.scales}")

    images, shown = trajectory(model, scheduler, args.trajectory_samples, args.trajectory_columns,
                               args.sampler, steps, args.seed, device, amp_dtype, autoguidance)
    path = os.path.join(args.outdir, "trajectory.png")
    save_grid(images, path, nrow=len(shown), scale=args.scale)
    print(f"wrote {path}: columns t = {shown}; per sample, x_t above and x0_hat below")

    frames = denoising_frames(model, scheduler, args.gif_samples, args.sampler, steps, args.seed, device,
                              amp_dtype, autoguidance)
    path = os.path.join(args.outdir, "denoising.gif")
    frame_ms = min(max(GIF_MOTION_MS // len(frames), 20), 200)
    save_gif(frames, path, nrow=len(frames[0]), scale=args.scale, frame_ms=frame_ms, last_ms=GIF_LAST_MS)
    print(f"wrote {path}: {len(frames)} frames (x_T, then x_t after each of the {steps} {args.sampler} "
          f"steps), {frame_ms} ms each, the final samples held {GIF_LAST_MS} ms")


if __name__ == "__main__":
    run_main(main)
