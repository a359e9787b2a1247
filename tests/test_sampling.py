"""The sampling loop, driven by oracle models whose exact answers are known in
closed form (a single-image data set and a Gaussian data set)."""

import numpy as np
import pytest
import torch

from sampling import DEFAULT_STEPS, SAMPLERS, sample, timestep_schedule
from scheduler import NoiseScheduler

SHAPE = (2, 1, 8, 8)


def ref_alphas_cumprod(schedule, T=1000):
    """float64 alpha bar of the two schedules, written from the papers."""
    if schedule == "linear":
        betas = np.linspace(1e-4, 0.02, T)
    else:
        f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(T)
        betas = np.minimum(1 - f(t + 1) / f(t), 0.999)
    return torch.from_numpy(np.cumprod(1 - betas))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def x_T(seed=0, shape=SHAPE):
    """The x_T that sample() draws first from a generator seeded with `seed`."""
    return torch.randn(shape, generator=seeded(seed))


class PointOracle:
    """Exact noise prediction when the data distribution is the single image x_star:
    eps(x_t, t) = (x_t - sqrt(ab_t) x_star) / sqrt(1 - ab_t). Records every call."""

    def __init__(self, x_star, ab):
        self.x_star, self.ab, self.calls = x_star.double(), ab, []

    def __call__(self, x, t):
        assert x.dtype == torch.float32 and t.dtype == torch.int64 and t.shape == (x.shape[0],)
        self.calls.append(t.clone())
        a = self.ab[t].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * self.x_star) / (1 - a).sqrt()).float()


class GaussianOracle:
    """Exact E[eps | x_t] when every pixel of x0 is N(mu, sd^2) independently:
    eps = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab sd^2 + 1 - ab)."""

    def __init__(self, mu, sd, ab):
        self.mu, self.sd, self.ab = mu, sd, ab

    def __call__(self, x, t):
        a = self.ab[t].view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * self.mu) / (a * self.sd**2 + 1 - a)).float()

    def _z(self, x_T):
        """The probability-flow ODE keeps z = (x_t - sqrt(ab) mu) / sqrt(ab sd^2 + 1 - ab)
        constant along a trajectory (a monotone map between 1-D Gaussians)."""
        a = self.ab[-1]
        return (x_T.double() - a.sqrt() * self.mu) / (a * self.sd**2 + 1 - a).sqrt()

    def ode_state(self, x_T, t):
        """Where the ODE trajectory from x_T passes at timestep t."""
        a = self.ab[t]
        return a.sqrt() * self.mu + (a * self.sd**2 + 1 - a).sqrt() * self._z(x_T)

    def ode_endpoint(self, x_T):
        """Where it ends (ab = 1): mu + sd z."""
        return self.mu + self.sd * self._z(x_T)


@pytest.fixture(scope="module")
def x_star():
    return torch.rand(SHAPE, generator=seeded(123)) * 1.8 - 0.9  # values in (-0.9, 0.9)


# ------------------------------------------------------------ timestep_schedule


def test_timestep_schedule_examples():
    assert timestep_schedule(10, 4) == [9, 6, 3, 0]
    assert timestep_schedule(10, 10) == list(range(9, -1, -1))
    assert timestep_schedule(10, 1) == [9]
    assert timestep_schedule(1, 1) == [0]
    assert timestep_schedule(1000, 2) == [999, 0]
    assert timestep_schedule(1000, 3) == [999, 500, 0]  # 499.5 rounds up
    ts = timestep_schedule(1000, 50)
    assert ts[:3] == [999, 979, 958] and ts[-1] == 0


@pytest.mark.parametrize("T", [2, 7, 10, 100, 1000])
def test_timestep_schedule_is_even_descending_unique(T):
    for steps in range(2, T + 1, max(1, T // 37)):
        ts = timestep_schedule(T, steps)
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] == 0
        gaps = -np.diff(ts)
        assert (gaps >= 1).all()  # strictly descending, hence no duplicates
        ideal = (T - 1) / (steps - 1)
        assert (np.abs(gaps - ideal) <= 1).all()  # evenly spaced up to rounding


@pytest.mark.parametrize("steps", [0, -3, 11, 2.5, None])
def test_timestep_schedule_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 10\]"):
        timestep_schedule(10, steps)


# --------------------------------------------------------------- point oracle


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(
    "sampler, steps, eta, clip_x0",
    [
        ("ddpm", None, 0.0, True),
        ("ddpm", None, 0.0, False),
        ("ddpm", 100, 0.0, True),
        ("ddim", 50, 0.0, True),
        ("ddim", 50, 1.0, True),
        ("ddim", 50, 0.0, False),
        ("dpm++2m", 20, 0.0, True),
        ("dpm++2m", 20, 0.0, False),
    ],
)
def test_every_sampler_lands_on_the_single_data_point(x_star, schedule, sampler, steps, eta, clip_x0):
    scheduler = NoiseScheduler(schedule=schedule)
    model = PointOracle(x_star, ref_alphas_cumprod(schedule))
    out = sample(model, scheduler, SHAPE, sampler=sampler, steps=steps, eta=eta, clip_x0=clip_x0, generator=seeded())
    assert out.dtype == torch.float32 and out.shape == SHAPE
    assert len(model.calls) == (steps or 1000)
    torch.testing.assert_close(out, x_star, rtol=0, atol=2e-4)


def test_samples_are_not_clamped():
    x_star = torch.linspace(-1.5, 1.5, 64).view(1, 1, 8, 8)
    model = PointOracle(x_star, ref_alphas_cumprod("linear"))
    for sampler in SAMPLERS:
        out = sample(model, NoiseScheduler(), (1, 1, 8, 8), sampler=sampler, steps=20, clip_x0=False,
                     generator=seeded())
        torch.testing.assert_close(out, x_star, rtol=0, atol=2e-4)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_deterministic_trajectory_follows_the_ode(x_star, sampler):
    """For a point data set the ODE keeps eps fixed: x_t = sqrt(ab_t) x* + sqrt(1 - ab_t) eps_T.
    DDIM (eta = 0) and DPM-Solver++ are exact here, so every visited x_t must lie on that line;
    x_T comes only from the generator, so the test rebuilds it from the seed."""
    ab = ref_alphas_cumprod("linear")
    model = PointOracle(x_star, ab)
    record = [999, 500, 105, 0, 123456]  # 123456 is never visited and is skipped
    out, trajectory = sample(model, NoiseScheduler(), SHAPE, sampler=sampler, steps=20, generator=seeded(7),
                             trajectory_at=record)
    assert [t for t, _, _ in trajectory] == [999, 105, 0]  # 500 is not on the 20-step schedule
    eps_T = (x_T(7).double() - ab[999].sqrt() * x_star) / (1 - ab[999]).sqrt()
    for t, x_t, x0_hat in trajectory:
        expected = ab[t].sqrt() * x_star + (1 - ab[t]).sqrt() * eps_T
        torch.testing.assert_close(x_t.double(), expected, rtol=0, atol=2e-4)
        torch.testing.assert_close(x0_hat.double(), x_star.double(), rtol=0, atol=2e-3)
    torch.testing.assert_close(out, x_star, rtol=0, atol=2e-4)


# ------------------------------------------------------------ Gaussian oracle


def test_full_ddpm_samples_the_gaussian_data_distribution():
    ab = ref_alphas_cumprod("linear")
    model = GaussianOracle(0.2, 0.5, ab)
    out = sample(model, NoiseScheduler(), (16, 1, 32, 32), clip_x0=False, generator=seeded(1))
    # 16384 samples: standard errors are about 0.004 for the mean and 0.003 for the std.
    assert out.mean().item() == pytest.approx(0.2, abs=0.02)
    assert out.std().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ode_solvers_converge_with_their_order(schedule):
    """Error to the exact ODE state at t = 27, visited by the 38-, 112- and 334-step
    schedules (spacings 27, 9, 3): dividing the step by 3 divides the error by about 3
    for DDIM (first order) and 9 for DPM-Solver++(2M) (second order)."""
    ab = ref_alphas_cumprod(schedule)
    model = GaussianOracle(0.2, 0.5, ab)
    scheduler = NoiseScheduler(schedule=schedule)
    t = 27
    exact = model.ode_state(x_T(3), t)

    def error(sampler, steps):
        _, trajectory = sample(model, scheduler, SHAPE, sampler=sampler, steps=steps, clip_x0=False,
                               generator=seeded(3), trajectory_at=[t])
        return (trajectory[0][1].double() - exact).abs().max().item()

    ddim = [error("ddim", n) for n in (38, 112, 334)]
    dpm = [error("dpm++2m", n) for n in (38, 112, 334)]
    assert 2.5 < ddim[0] / ddim[1] < 3.5 and 2.5 < ddim[1] / ddim[2] < 3.5, ddim
    assert dpm[0] / dpm[1] > 6 and dpm[1] / dpm[2] > 6, dpm
    assert dpm[0] < ddim[0] / 3  # better at the same number of model calls


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_20_steps_beats_ddim_50_at_the_endpoint(schedule):
    """Needs the first-order step into t = 0: a second-order one there overshoots (error ~0.5)."""
    ab = ref_alphas_cumprod(schedule)
    model = GaussianOracle(0.2, 0.5, ab)
    exact = model.ode_endpoint(x_T(3))

    def error(sampler, steps):
        out = sample(model, NoiseScheduler(schedule=schedule), SHAPE, sampler=sampler, steps=steps,
                     clip_x0=False, generator=seeded(3))
        return (out.double() - exact).abs().max().item()

    assert error("dpm++2m", 20) < error("ddim", 50) < 0.1
    assert error("dpm++2m", 100) < 0.005


def test_ddim_eta0_is_deterministic_given_x_T():
    model = GaussianOracle(0.2, 0.5, ref_alphas_cumprod("linear"))
    g = seeded(5)
    out = sample(model, NoiseScheduler(), SHAPE, sampler="ddim", steps=200, clip_x0=False, generator=g)
    # Only x_T was drawn: the generator is exactly one randn(SHAPE) further along.
    reference = seeded(5)
    reference_x_T = torch.randn(SHAPE, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())
    # The result is a function of x_T alone (here the exact ODE map, up to discretisation).
    assert (out.double() - model.ode_endpoint(reference_x_T)).abs().max().item() < 0.05


# ----------------------------------------------------------- loop bookkeeping


def test_respaced_ddpm_is_ddim_with_eta_1():
    model = GaussianOracle(0.2, 0.5, ref_alphas_cumprod("linear"))

    def run(sampler, eta=0.0):
        return sample(model, NoiseScheduler(), SHAPE, sampler=sampler, steps=25, eta=eta, generator=seeded(4))

    respaced = run("ddpm")
    assert torch.equal(respaced, run("ddim", eta=1.0))
    assert not torch.allclose(respaced, run("ddim"))



def test_full_ddpm_calls_the_model_at_every_timestep_in_order():
    model = PointOracle(torch.zeros(SHAPE), ref_alphas_cumprod("linear"))
    sample(model, NoiseScheduler(), SHAPE, generator=seeded())
    assert len(model.calls) == 1000
    for expected, t in zip(range(999, -1, -1), model.calls):
        assert t.tolist() == [expected] * SHAPE[0]


@pytest.mark.parametrize(
    "sampler, steps", [("ddim", 1), ("ddim", 7), ("ddim", 50), ("ddpm", 25), ("dpm++2m", 2), ("dpm++2m", 20)]
)
def test_model_calls_equal_steps(sampler, steps):
    model = PointOracle(torch.zeros(SHAPE), ref_alphas_cumprod("linear"))
    sample(model, NoiseScheduler(), SHAPE, sampler=sampler, steps=steps, generator=seeded())
    assert [t[0].item() for t in model.calls] == timestep_schedule(1000, steps)


def test_default_steps():
    assert SAMPLERS == ("ddpm", "ddim", "dpm++2m") and set(DEFAULT_STEPS) == set(SAMPLERS)
    for sampler, expected_calls in [("ddim", 50), ("dpm++2m", 20), ("ddpm", 1000)]:
        model = PointOracle(torch.zeros(SHAPE), ref_alphas_cumprod("linear"))
        sample(model, NoiseScheduler(), SHAPE, sampler=sampler, generator=seeded())
        assert len(model.calls) == expected_calls
    # Small T: the default step count is capped at T.
    model = PointOracle(torch.zeros(SHAPE), ref_alphas_cumprod("linear", T=10))
    sample(model, NoiseScheduler(timesteps=10), SHAPE, sampler="ddim", generator=seeded())
    assert len(model.calls) == 10


@pytest.mark.parametrize(
    "sampler, steps, eta",
    [("ddpm", None, 0.0), ("ddpm", 10, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0), ("dpm++2m", 10, 0.0)],
)
def test_seeded_generator_reproduces_samples(sampler, steps, eta):
    scheduler = NoiseScheduler(timesteps=100)
    model = GaussianOracle(0.0, 0.5, ref_alphas_cumprod("linear", T=100))
    kwargs = dict(sampler=sampler, steps=steps, eta=eta)
    a = sample(model, scheduler, SHAPE, generator=seeded(11), **kwargs)
    b = sample(model, scheduler, SHAPE, generator=seeded(11), **kwargs)
    c = sample(model, scheduler, SHAPE, generator=seeded(12), **kwargs)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_low_precision_model_output_is_cast():
    model = PointOracle(torch.zeros(SHAPE), ref_alphas_cumprod("linear", T=10))
    out = sample(lambda x, t: model(x, t).bfloat16(), NoiseScheduler(timesteps=10), SHAPE, generator=seeded())
    assert out.dtype == torch.float32


def test_progress_bar(capsys):
    model = PointOracle(torch.zeros(SHAPE), ref_alphas_cumprod("linear", T=10))
    sample(model, NoiseScheduler(timesteps=10), SHAPE, sampler="ddim", steps=5, progress=True, generator=seeded())
    assert "5/5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler": "euler"}, r"unknown sampler 'euler'; expected one of \('ddpm', 'ddim', 'dpm\+\+2m'\)"),
        ({"sampler": "ddim", "steps": 0}, r"steps must be an integer in \[1, 10\]"),
        ({"sampler": "ddim", "steps": 11}, r"steps must be an integer in \[1, 10\]"),
        ({"sampler": "ddpm", "steps": 2.5}, r"steps must be an integer in \[1, 10\]"),
        ({"sampler": "ddim", "eta": -1.0}, "eta"),
        ({"sampler": "dpm++2m", "eta": 0.5}, "eta"),
    ],
)
def test_bad_arguments_raise_before_sampling(kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        sample(lambda x, t: calls.append(t) or x, NoiseScheduler(timesteps=10), SHAPE, **kwargs)
    assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_loop_has_no_host_device_sync(sampler):
    scheduler = NoiseScheduler(timesteps=50, device="cuda")
    ab = ref_alphas_cumprod("linear", T=50).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)

    def model(x, t):
        a = ab[t].view(-1, 1, 1, 1).float()
        return (x - a.sqrt() * 0.1) / (1 - a).sqrt()

    torch.cuda.set_sync_debug_mode("error")
    try:
        steps = None if sampler == "ddpm" else 10
        out = sample(model, scheduler, SHAPE, sampler=sampler, steps=steps, generator=g, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.device.type == "cuda"
