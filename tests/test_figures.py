"""figures.py: the loss curve from metrics.csv, the denoising GIF and the magnified pictures,
on a tiny untrained model B saved as a checkpoint (no training run needed)."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import figures
from checkpoint import build_guide, save_checkpoint
from cli import run_main
from dit import DiT
from dit_cfg import ConditionalDiT
from images import save_grid
from sampling import DEFAULT_GUIDANCE_SCALE, generate_images
from scheduler import NoiseScheduler

HEADER = "step,epoch,loss,lr,img_per_s,elapsed_s\n"
IMG = 8  # tiny digits: 8x8 pixels, 2x2 patches of 4


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A model B checkpoint with random weights (all of them, so that the output is not the
    zero that DiT's initialisation gives) and a 50-step schedule."""
    torch.manual_seed(0)
    model = ConditionalDiT(img_size=IMG, patch_size=4, dim=32, depth=1, heads=2, cond_tokens=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_final.pt"
    save_checkpoint({"kind": model.kind, "model_config": dict(model.config),
                     "scheduler_config": NoiseScheduler(timesteps=50).config,
                     "model": state, "ema": state}, str(path))
    return str(path)


def write_metrics(path, rows, end="\n"):
    """rows: (step, loss) pairs -> a metrics.csv as training writes it (other columns made up)."""
    lines = [f"{step},{step / 100},{loss},0.001,300.0,{step / 5}" for step, loss in rows]
    path.write_text(HEADER + "\n".join(lines) + end)
    return str(path)


def error_of(argv, monkeypatch, capsys):
    """figures.py run as its __main__ runs it; it must fail with one line, which is returned."""
    monkeypatch.setattr(sys, "argv", ["figures.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main(figures.main)
    code = exit_info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code not in (0, None) and "\n" not in message.strip()
    return message


def frames_of(path):
    """An animated GIF -> ([grayscale frames as uint8 arrays], [durations in ms])."""
    image = Image.open(path)
    frames, durations = [], []
    for index in range(image.n_frames):
        image.seek(index)
        frames.append(np.array(image.convert("L")))
        durations.append(image.info["duration"])
    return frames, durations


def blue_rows(image, column):
    """Rows of `column` where the running-mean curve (figures.MEAN_COLOR) is drawn."""
    pixels = np.array(image)[:, column]
    return np.flatnonzero((pixels == figures.MEAN_COLOR).all(axis=1))


def test_checkpoint_figures_with_the_loss_curve_and_gif(tiny_ckpt, tmp_path):
    metrics = write_metrics(tmp_path / "metrics.csv", [(10 * i, 1 / i) for i in range(1, 30)])
    outdir = tmp_path / "out"
    steps, samples = 3, 3
    figures.main(["--ckpt", tiny_ckpt, "--metrics", metrics, "--outdir", str(outdir), "--steps", str(steps),
                  "--scales", "0,2", "--trajectory_columns", "2", "--trajectory_samples", "1",
                  "--gif_samples", str(samples), "--precision", "fp32", "--device", "cpu"])
    assert sorted(os.listdir(outdir)) == ["denoising.gif", "guidance_sweep.png", "loss.png", "trajectory.png"]
    cell = 3 * (IMG + 2)  # default --scale 3: a digit and its padding, magnified
    assert Image.open(outdir / "guidance_sweep.png").size == (2 * cell + 6, 10 * cell + 6)
    assert Image.open(outdir / "trajectory.png").size == (2 * cell + 6, 2 * cell + 6)
    assert Image.open(outdir / "loss.png").size == figures.LOSS_PLOT_SIZE

    frames, durations = frames_of(outdir / "denoising.gif")
    assert len(frames) == steps + 1  # the noise, then one frame per step
    assert frames[0].shape == (cell + 6, samples * cell + 6)  # one row of digits
    assert durations[-1] == figures.GIF_LAST_MS and max(durations[:-1]) < durations[-1]
    # the first frame is the starting noise and the last the samples the sampler returns,
    # both laid out and magnified as save_grid does
    noise = torch.randn(samples, 1, IMG, IMG, generator=torch.Generator().manual_seed(0))
    model, scheduler = figures.load_model(tiny_ckpt)[:2]
    final = generate_images(model, scheduler, samples, labels=torch.arange(samples),
                            guidance_scale=DEFAULT_GUIDANCE_SCALE, sampler="dpm++2m", steps=steps, seed=0)
    for batch, frame, name in ((noise, frames[0], "noise.png"), (final, frames[-1], "final.png")):
        save_grid(batch, tmp_path / name, nrow=samples, scale=3)
        np.testing.assert_array_equal(frame, np.array(Image.open(tmp_path / name)))
    assert not np.array_equal(frames[-2], frames[-1])  # the last step changed something


def test_model_a_figures_are_autoguided_as_infer_draws_them(tmp_path):
    """A model A checkpoint with a guide: the GIF's last frame is what generate_images draws with
    that guide at the scale and from the SNR its run chose (train.py --guidance_scale and
    --guidance_min_snr; infer.py's defaults), not the model alone nor the guide on every step
    (of the 4 steps on 50 timesteps, t = 49, 33, 16, 0, SNR 0.005 leaves t = 49 unguided)."""
    torch.manual_seed(0)
    model = DiT(img_size=IMG, patch_size=4, dim=32, depth=1, heads=2)
    weights = []
    for _ in range(2):  # the model's and the guide's random weights
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0, 0.2)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    path = str(tmp_path / "a.pt")
    save_checkpoint({"kind": model.kind, "model_config": dict(model.config), "model": weights[0],
                     "scheduler_config": NoiseScheduler(timesteps=50).config, "ema": weights[0],
                     "guide": weights[1], "args": {"guide_epoch": 1, "guidance_scale": 2.0, "guidance_min_snr": 0.005}}, path)
    samples, steps = 3, 4
    figures.main(["--ckpt", path, "--outdir", str(tmp_path / "out"), "--steps", str(steps), "--gif_samples",
                  str(samples), "--trajectory_columns", "2", "--trajectory_samples", "1", "--precision", "fp32"])
    last = frames_of(tmp_path / "out" / "denoising.gif")[0][-1]
    model, scheduler, ckpt = figures.load_model(path)
    drawn = {}
    for name, guide, min_snr in (("guided", build_guide(ckpt), 0.005), ("every_step", build_guide(ckpt), 0.0),
                                 ("alone", None, 0.0)):
        images = generate_images(model, scheduler, samples, guide=guide, guidance_scale=2.0,
                                 guidance_min_snr=min_snr, sampler="dpm++2m", steps=steps, seed=0)
        save_grid(images, tmp_path / f"{name}.png", nrow=samples, scale=3)
        drawn[name] = np.array(Image.open(tmp_path / f"{name}.png"))
    np.testing.assert_array_equal(last, drawn["guided"])
    assert not np.array_equal(drawn["guided"], drawn["alone"])
    assert not np.array_equal(drawn["guided"], drawn["every_step"])


def test_metrics_alone_draws_only_the_loss_curve(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.csv", [(10, 0.9), (20, 0.5)])
    figures.main(["--metrics", metrics, "--outdir", str(tmp_path / "out")])
    assert os.listdir(tmp_path / "out") == ["loss.png"]


def test_loss_axis_is_logarithmic(tmp_path):
    """Plateaus at 1, 0.1 and 0.01 are drawn equally far apart (a decade each)."""
    rows = [(step, 1.0 if step <= 1000 else 0.1 if step <= 2000 else 0.01) for step in range(10, 3001, 10)]
    figures.main(["--metrics", write_metrics(tmp_path / "metrics.csv", rows), "--smooth", "0",
                  "--outdir", str(tmp_path)])
    image = Image.open(tmp_path / "loss.png")
    left, _, right, _ = figures.LOSS_PLOT_MARGINS
    width = figures.LOSS_PLOT_SIZE[0] - left - right
    # the middle of each plateau: steps 500, 1500, 2500 of 3000
    heights = [blue_rows(image, left + round(width * k / 6)).mean() for k in (1, 3, 5)]
    assert heights[0] < heights[1] < heights[2]  # smaller losses lower down
    assert heights[1] - heights[0] == pytest.approx(heights[2] - heights[1], abs=1.5)


def test_running_mean_weights_rows_by_their_steps():
    steps, losses = [10, 20, 25, 35], [1.0, 2.0, 3.0, 4.0]
    assert figures.running_mean(steps, losses, 0) == losses
    # window 20 around step 20: the rows at 10, 20 and 25, which cover 10, 10 and 5 steps
    assert figures.running_mean(steps, losses, 20)[1] == pytest.approx((1 * 10 + 2 * 10 + 3 * 5) / 25)
    # a window wider than the run: every row, everywhere
    overall = (1 * 10 + 2 * 10 + 3 * 5 + 4 * 10) / 35
    assert figures.running_mean(steps, losses, 100) == pytest.approx([overall] * 4)


def test_smoothing_flattens_noisy_rows(tmp_path):
    """Thousands of rows scattered around a flat loss (log-normal, about a factor of 1.35 each
    way): the blue curve is a thin line inside the gray band of the rows."""
    noise = torch.randn(3000, generator=torch.Generator().manual_seed(0)).mul(0.3).exp()
    rows = [(10 * i, 0.05 * float(factor)) for i, factor in enumerate(noise, start=1)]
    figures.main(["--metrics", write_metrics(tmp_path / "metrics.csv", rows), "--outdir", str(tmp_path)])
    pixels = np.array(Image.open(tmp_path / "loss.png"))
    left, top, right, bottom = figures.LOSS_PLOT_MARGINS
    plot_width = figures.LOSS_PLOT_SIZE[0] - left - right
    middle = pixels[:, left + plot_width // 4: left + 3 * plot_width // 4]  # away from the window's ends
    blue = np.flatnonzero((middle == figures.MEAN_COLOR).all(axis=2).any(axis=1))
    gray = np.flatnonzero((middle == figures.RAW_COLOR).all(axis=2).any(axis=1))
    assert np.ptp(blue) * 5 < np.ptp(gray)


@pytest.mark.parametrize("lo,hi,expected", [
    (1e-4, 10, [1e-4, 1e-3, 1e-2, 0.1, 1, 10]),    # wide: powers of ten
    (0.015, 1.2, [0.02, 0.05, 0.1, 0.2, 0.5, 1]),  # two decades: 1-2-5
    (0.031, 0.062, [0.04, 0.05, 0.06]),            # narrow: evenly spaced
])
def test_log_ticks(lo, hi, expected):
    assert figures.log_ticks(lo, hi) == pytest.approx(expected)


def test_resumed_rows_replace_the_ones_written_after_the_checkpoint(tmp_path):
    """Rows to step 40 were written, the run was stopped and resumed from its checkpoint at
    step 20: the resumed run's rows from 30 on are the ones drawn."""
    path = write_metrics(tmp_path / "metrics.csv",
                         [(10, 1.0), (20, 0.9), (30, 0.8), (40, 0.7), (30, 0.6), (40, 0.5), (50, 0.4)])
    assert figures.read_metrics(path) == ([10, 20, 30, 40, 50], [1.0, 0.9, 0.6, 0.5, 0.4])


def test_a_row_being_written_is_left_out(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(HEADER + "10,0.1,0.9,0.001,300,2\n20,0.2,0.8,0.0")  # training is mid-line
    assert figures.read_metrics(str(path)) == ([10], [0.9])
    path.write_text(HEADER + "10,0.1,0.9,0.001,300,2\n20,0.2,0.8,0.001,300,4")  # a whole last row
    assert figures.read_metrics(str(path)) == ([10, 20], [0.9, 0.8])


@pytest.mark.parametrize("content,expected", [
    ("", "first line should be step,epoch,loss,lr,img_per_s,elapsed_s"),
    ("step,loss\n10,0.5\n", "first line should be"),
    ("epoch,step,loss,lr,img_per_s,elapsed_s\n", "first line should be"),
    (HEADER, "has no rows yet"),
    (HEADER + "10,0.1,0.5,0.001\n", "line 2: expected 6 comma-separated values"),
    (HEADER + "10,0.1,0.5,0.001,300,2\n1e2,0.2,0.4,0.001,300,4\n", "line 3: step should be an integer"),
    (HEADER + "10,0.1,nope,0.001,300,2\n", "line 2: loss should be a number"),
    (HEADER + "10,0.1,0,0.001,300,2\n", "cannot be drawn on a log scale"),
    (HEADER + "10,0.1,nan,0.001,300,2\n", "cannot be drawn on a log scale"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a text file"),
    (None, "cannot read the metrics file"),  # no such file
])
def test_bad_metrics_end_in_one_line_before_any_work(content, expected, tiny_ckpt, tmp_path, monkeypatch,
                                                     capsys):
    path = tmp_path / "metrics.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)

    def fail(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(figures, "load_model", fail)
    message = error_of(["--metrics", str(path), "--ckpt", tiny_ckpt, "--outdir", str(tmp_path / "out")],
                       monkeypatch, capsys)
    assert expected in message and str(path) in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    ([], "nothing to draw"),
    (["--metrics", "m.csv", "--smooth", "2"], "--smooth is a fraction"),
    (["--ckpt", "c.pt", "--scale", "0"], "must be a positive integer"),
])
def test_bad_figures_options(args, expected, monkeypatch, capsys):
    assert expected in error_of(args, monkeypatch, capsys)
