"""The sampling loop, driven by oracle models whose exact answers are known in
closed form (a single-image data set and a Gaussian data set)."""

import math

import numpy as np
import pytest
import torch

from sampling import (DEFAULT_AUTOGUIDANCE_MAX_SNR, DEFAULT_AUTOGUIDANCE_MIN_SNR, DEFAULT_AUTOGUIDANCE_SCALE,
                      DEFAULT_STEPS, FEW_STEP_VARIANCE, SAMPLERS, VARIANCES, autoguided_fn, default_variance,
                      generate_images, run_autoguidance, sample, timestep_schedule)
from scheduler import NoiseScheduler
from tests.conftest import ref_alphas_cumprod

SHAPE = (2, 1, 8, 8)


def ref_ab(schedule, T=1000):
    """float64 (T,) tensor of alpha bar, from the papers (tests/conftest.py), for the oracles;
    the linear schedule's endpoints 1e-4 and 0.02 are for T = 1000 and scaled by 1000 / T."""
    k = 1000 / T
    return torch.from_numpy(ref_alphas_cumprod(schedule, T, beta_start=1e-4 * k, beta_end=0.02 * k)[1])


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


def v_of(eps_oracle, ab):
    """The v prediction v = sqrt(ab) eps - sqrt(1 - ab) x0 of an oracle that knows eps, with
    x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) (written from the definitions, not scheduler.py)."""
    def model(x, t):
        a = ab[t].view(-1, 1, 1, 1)
        eps = eps_oracle(x, t).double()
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()
    return model


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
    """The endpoint and the call count only: every sampler's last step returns x0_hat, which is
    x* from any x_t, so a wrong intermediate step does not show here. The visited states are
    checked by the trajectory and marginal tests below."""
    scheduler = NoiseScheduler(schedule=schedule)
    model = PointOracle(x_star, ref_ab(schedule))
    out = sample(model, scheduler, SHAPE, sampler=sampler, steps=steps, eta=eta, clip_x0=clip_x0, generator=seeded())
    assert out.dtype == torch.float32 and out.shape == SHAPE
    assert len(model.calls) == (steps or 1000)
    torch.testing.assert_close(out, x_star, rtol=0, atol=2e-4)


def test_samples_are_not_clamped():
    x_star = torch.linspace(-1.5, 1.5, 64).view(1, 1, 8, 8)
    model = PointOracle(x_star, ref_ab("linear"))
    for sampler in SAMPLERS:
        out = sample(model, NoiseScheduler(), (1, 1, 8, 8), sampler=sampler, steps=20, clip_x0=False,
                     generator=seeded())
        torch.testing.assert_close(out, x_star, rtol=0, atol=2e-4)


# Where a visited x_t may sit off the exact ODE path, per schedule: float32 rounding only. The
# first step's x0_hat = (x_T - sqrt(1 - ab) eps) / sqrt(ab) divides the rounding of x_T and eps
# (about 2^-24 |x|, |x| < 5) by sqrt(ab_{T-1}) = 6.4e-3 (linear) or 4.9e-5 (cosine); the next
# step scales it back by its own sqrt(ab), which leaves every later x_t off the path by at most
# 2.4e-6 (linear) and 1.7e-4 (cosine), measured. A table read one timestep off moves the path
# by 5e-4 to 6e-2 (measured: DDIM's ab_prev 6e-2, DPM-Solver's lambdas 2e-2, its sqrt(ab)
# 4.6e-4 linear / 1.4e-3 cosine), and the lambdas' error does not reach the final sample at all.
PATH_ATOL = {"linear": 2e-5, "cosine": 5e-4}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("clip_x0", [True, False])
@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("dpm++2m", 20)])
def test_deterministic_trajectory_follows_the_ode(x_star, schedule, clip_x0, sampler, steps):
    """For a point data set the ODE keeps eps fixed: x_t = sqrt(ab_t) x* + sqrt(1 - ab_t) eps_T.
    DDIM (eta = 0) and DPM-Solver++ are exact here, so every visited x_t must lie on that line,
    not only the final sample (which any sampler's last step sets to x0_hat = x*). x_T comes
    only from the generator, so the test rebuilds it from the seed."""
    ab = ref_ab(schedule)
    model = PointOracle(x_star, ab)
    record = [*range(1000), 123456]  # every timestep; the loop skips those it does not visit
    out, trajectory = sample(model, NoiseScheduler(schedule=schedule), SHAPE, sampler=sampler, steps=steps,
                             clip_x0=clip_x0, generator=seeded(7), trajectory_at=record)
    assert [t for t, _, _ in trajectory] == timestep_schedule(1000, steps)
    eps_T = (x_T(7).double() - ab[999].sqrt() * x_star) / (1 - ab[999]).sqrt()
    for t, x_t, x0_hat in trajectory:
        expected = ab[t].sqrt() * x_star + (1 - ab[t]).sqrt() * eps_T
        torch.testing.assert_close(x_t.double(), expected, rtol=0, atol=PATH_ATOL[schedule], msg=f"x_t at t={t}")
        # x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab): the numerator's float32 rounding (< 1e-6)
        # over sqrt(ab_t), up to 2e-2 at t = 999 of the cosine schedule (2.1e-3 measured there).
        torch.testing.assert_close(x0_hat.double(), x_star.double(), rtol=0, atol=1e-5 + 1e-6 / ab[t].sqrt().item(),
                                   msg=f"x0_hat at t={t}")
    torch.testing.assert_close(out, x_star, rtol=0, atol=2e-4)


# Many independent pixels for the statistical checks below: 65536 gives standard errors of
# 1/256 for a mean and 1/362 for a std (relative), 1/256 at most for a correlation. Their
# tolerance is 5 standard errors, which a correct sampler exceeds with probability < 1e-6 per
# check; the generators are seeded, so the outcome is fixed anyway.
BIG = (256, 1, 16, 16)
N_BIG = 256 * 16 * 16


def five_se(scale=1.0):
    return 5 * scale / N_BIG**0.5


def corr(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, steps, eta, variance",
                         [("ddpm", 25, 0.0, "posterior"), ("ddim", 50, 0.5, None), ("ddim", 20, 1.0, None)])
def test_stochastic_ddim_keeps_the_forward_marginals_of_a_point(schedule, sampler, steps, eta, variance):
    """DDIM with any eta (and respaced "ddpm" with the posterior variance, which is eta = 1) is
    built so that, given the true x0, every x_t it visits is distributed as q(x_t | x0) =
    N(sqrt(ab_t) x0, (1 - ab_t) I) (Song et al. 2021, eq. 7 and Lemma 1). The point oracle knows
    x0 = x*, so at every visited t
        z_t = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t)
    is standard normal, and from t to the next visited t' (eq. 12, sigma^2 of eq. 16)
        z_t' sqrt(1 - ab') = sqrt(1 - ab' - sigma^2) z_t + sigma n,
        sigma^2 = eta^2 (1 - ab') / (1 - ab) (1 - ab / ab'),
    so corr(z_t, z_t') = sqrt(1 - sigma^2 / (1 - ab')). Too little or too much noise shows in
    std(z_t), a wrong sigma in the correlation; the final sample (x0_hat = x*) shows neither.
    (x_T ~ N(0, I) is off q(x_T | x*) by a mean of sqrt(ab_{T-1}) |x*| < 0.006: negligible.)"""
    ab = ref_ab(schedule)
    x_star = torch.rand(BIG[1:], generator=seeded(123)) * 1.8 - 0.9  # one image, broadcast over the batch
    out, trajectory = sample(PointOracle(x_star, ab), NoiseScheduler(schedule=schedule), BIG, sampler=sampler,
                             steps=steps, eta=eta, variance=variance, generator=seeded(1),
                             trajectory_at=range(1000))
    eta = 1.0 if sampler == "ddpm" else eta
    zs = [(t, (x.double() - ab[t].sqrt() * x_star) / (1 - ab[t]).sqrt()) for t, x, _ in trajectory]
    assert [t for t, _ in zs] == timestep_schedule(1000, steps)
    for t, z in zs:
        assert abs(z.mean().item()) < five_se() + 0.006, t
        assert abs(z.std().item() - 1) < five_se(2**-0.5), t
    for (t, z), (t_next, z_next) in zip(zs, zs[1:]):
        ratio = ab[t] / ab[t_next]
        expected = (1 - eta**2 * (1 - ratio) / (1 - ab[t])).sqrt().item()
        assert abs(corr(z, z_next) - expected) < five_se(), (t, t_next, expected)
    torch.testing.assert_close(out, x_star.expand(BIG), rtol=0, atol=2e-4)


def ancestral_jump(ab, t, t_prev, variance):
    """(coef1, coef2, sigma^2) of the ancestral jump t -> t_prev of the chain respaced to the
    visited timesteps, written from its betas beta' = 1 - ab_t / ab_{t_prev} (ab_{-1} = 1):
        mean = coef1 x0 + coef2 x_t,   coef1 = beta' sqrt(ab_{t_prev}) / (1 - ab_t),
                                       coef2 = sqrt(1 - beta') (1 - ab_{t_prev}) / (1 - ab_t)
    (Ho et al. eq. 7 for that chain), sigma^2 = beta' ("beta") or beta' (1 - ab_{t_prev}) / (1 - ab_t)
    ("posterior"). ab: float64 numpy (T,)."""
    a, a_prev = ab[t], 1.0 if t_prev == -1 else ab[t_prev]
    beta = 1 - a / a_prev
    coef1 = beta * np.sqrt(a_prev) / (1 - a)
    coef2 = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
    return coef1, coef2, beta if variance == "beta" else beta * (1 - a_prev) / (1 - a)


def ancestral_chain_moments(ab, timesteps, variance):
    """With the point oracle each jump is x_{t'} = coef1 x* + coef2 x_t + sigma n, so x_t ~
    N(k_t x*, v_t) at every visited t, with
        k_{t'} = coef1 + coef2 k_t,   v_{t'} = coef2^2 v_t + sigma^2,   k = 0, v = 1 at t = T-1,
    and corr(x_t, x_{t'}) = coef2 sqrt(v_t / v_{t'}). Returns {t: (k_t, v_t)}, {t: that corr}."""
    moments, corrs = {timesteps[0]: (0.0, 1.0)}, {}
    for t, t_prev in zip(timesteps, timesteps[1:]):
        coef1, coef2, sigma2 = ancestral_jump(ab, t, t_prev, variance)
        k, v = moments[t]
        moments[t_prev] = (coef1 + coef2 * k, coef2**2 * v + sigma2)
        corrs[t] = coef2 * (v / moments[t_prev][1]) ** 0.5
    return moments, corrs


@pytest.mark.parametrize(
    "schedule, variance, steps",
    [*((schedule, variance, steps) for schedule in ("linear", "cosine") for variance in ("beta", "posterior")
       for steps in (10, 25)),
     ("linear", "beta", 1000), ("cosine", "beta", 1000), ("linear", "posterior", 1000)],
)
def test_ddpm_states_have_the_moments_of_their_markov_chain(schedule, variance, steps):
    """Every visited state of "ddpm" against ancestral_chain_moments, computed in float64 from
    the papers' alpha bars: the same variance family at every step count. "posterior" keeps
    v_t = 1 - ab_t (the marginals of q); "beta" adds more noise, and the more the longer the
    jump: its std over sqrt(1 - ab_t) is 1.05 at t = 10 and 1.36 at t = 0 of the full linear
    chain, 1.68 at t = 111 and 35 at t = 0 of the 10-step one. Drawing either family with the
    other's variance, or with none, fails. Over the full chain, states near t = 0 and a
    consecutive pair every 64 steps are checked."""
    _, ab = ref_alphas_cumprod(schedule)
    timesteps = timestep_schedule(1000, steps)
    moments, corrs = ancestral_chain_moments(ab, timesteps, variance)
    record = set(timesteps) if steps < 1000 else {*range(0, 40), *(s - d for s in range(999, 40, -64) for d in (0, 1))}

    x_star = torch.rand(BIG[1:], generator=seeded(123)) * 1.8 - 0.9
    _, trajectory = sample(PointOracle(x_star, torch.from_numpy(ab)), NoiseScheduler(schedule=schedule), BIG,
                           steps=steps, variance=variance, generator=seeded(1), trajectory_at=record)
    states = {t: (x.double() - moments[t][0] * x_star) / moments[t][1] ** 0.5 for t, x, _ in trajectory}
    assert set(states) == record  # each N(0, 1)
    following = dict(zip(timesteps, timesteps[1:]))
    for t, r in states.items():
        assert abs(r.mean().item()) < five_se(), t
        assert abs(r.std().item() - 1) < five_se(2**-0.5), t
        if following.get(t) in states:
            assert abs(corr(r, states[following[t]]) - corrs[t]) < five_se(), t


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_families_at_all_steps_are_the_full_chain_step(schedule):
    """At K = T the respaced chain is the full one: beta' = beta_t, so each family's loop is
    scheduler.sample_prev_image_distribution(x, t, eps, variance=...) step for step, to the bit
    (same generator draws: x_T, then one noise tensor per step)."""
    T = 100
    scheduler = NoiseScheduler(timesteps=T, schedule=schedule)
    model = GaussianOracle(0.2, 0.5, ref_ab(schedule, T))
    for variance in ("beta", "posterior"):
        out = sample(model, scheduler, SHAPE, steps=T, variance=variance, generator=seeded(9))
        g = seeded(9)
        x = torch.randn(SHAPE, generator=g)
        for t in range(T - 1, -1, -1):
            eps = model(x, torch.full((SHAPE[0],), t))
            x = scheduler.sample_prev_image_distribution(x, t, eps, noise=torch.randn(SHAPE, generator=g),
                                                         variance=variance)
        assert torch.equal(out, x), variance


# ------------------------------------------------------------ Gaussian oracle


@pytest.mark.parametrize("sampler, steps, eta, variance", [("ddpm", None, 0.0, None), ("ddpm", 1000, 0.0, "posterior"),
                                                           ("ddpm", 500, 0.0, "posterior"), ("ddim", 1000, 0.5, None),
                                                           ("ddim", 1000, 1.0, None)])
def test_stochastic_samplers_sample_the_gaussian_data_distribution(sampler, steps, eta, variance):
    """With small steps the stochastic samplers reproduce N(0.2, 0.5^2): full ancestral sampling
    with either variance, the respaced chain on 500 steps, DDIM with eta > 0 on 1000. 16384
    samples: standard errors are about 0.004 for the mean and 0.003 for the std. The
    discretisation moves the std by 0.0075 at 500 steps and by at most 0.004 at 1000 (the closed
    forms of the next test), hence 0.02."""
    ab = ref_ab("linear")
    model = GaussianOracle(0.2, 0.5, ab)
    out = sample(model, NoiseScheduler(), (16, 1, 32, 32), sampler=sampler, steps=steps, eta=eta, variance=variance,
                 clip_x0=False, generator=seeded(1))
    assert out.mean().item() == pytest.approx(0.2, abs=0.02)
    assert out.std().item() == pytest.approx(0.5, abs=0.02)


def ddim_chain_std(ab, steps, eta, sd):
    """Std of the final sample of DDIM (Song et al. 2021, eq. 12 and 16) with the exact E[eps | x_t]
    when every pixel of x0 is N(mu, sd^2): a linear Gaussian chain, so in float64 on y = x - sqrt(ab) mu
        E[x0 | x_t] - mu = g y,  g = sqrt(ab) sd^2 / (ab sd^2 + 1 - ab)      (Gaussian conditioning)
        E[eps | x_t]     = e y,  e = (1 - sqrt(ab) g) / sqrt(1 - ab)
        y' = sqrt(ab') g y + sqrt(1 - ab' - sigma^2) e y + sigma n,   Var y' = A^2 Var y + sigma^2,
    from Var y_T = 1, with ab' = 1 after the last step."""
    timesteps = timestep_schedule(len(ab), steps)
    var = 1.0
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        a, a_prev = float(ab[t]), 1.0 if t_prev == -1 else float(ab[t_prev])
        g = a**0.5 * sd**2 / (a * sd**2 + 1 - a)
        e = (1 - a**0.5 * g) / (1 - a) ** 0.5
        sigma2 = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        gain = a_prev**0.5 * g + max(1 - a_prev - sigma2, 0.0) ** 0.5 * e
        var = gain**2 * var + sigma2
    return var**0.5


def ancestral_chain_std(ab, steps, variance, sd):
    """Std of the final sample of "ddpm" (ancestral_jump's chain, no noise on the last jump
    t = 0 -> clean) with the exact E[eps | x_t] on N(mu, sd^2) pixels, in float64 on
    y = x - sqrt(ab) mu: the mean is coef1 x0_hat + coef2 x_t with x0_hat - mu = g y (ddim_chain_std)
    and coef1 + coef2 sqrt(ab) = sqrt(ab'), so y' = (coef1 g + coef2) y + sigma n."""
    timesteps = timestep_schedule(len(ab), steps)
    var = 1.0
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        a = float(ab[t])
        g = a**0.5 * sd**2 / (a * sd**2 + 1 - a)
        coef1, coef2, sigma2 = ancestral_jump(ab, t, t_prev, variance)
        var = (coef1 * g + coef2) ** 2 * var + (0.0 if t_prev == -1 else sigma2)
    return var**0.5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, steps, eta, variance",
                         [("ddpm", 25, 0.0, "posterior"), ("ddpm", 25, 0.0, "beta"), ("ddpm", 100, 0.0, "posterior"),
                          ("ddpm", 100, 0.0, "beta"), ("ddim", 50, 0.5, None), ("ddim", 20, 1.0, None)])
def test_stochastic_samplers_give_the_exact_moments_on_gaussian_data(schedule, sampler, steps, eta, variance):
    """Respaced ancestral sampling (both variance families) and DDIM with eta > 0 on N(0.2, 0.5^2)
    data with the exact model: the mean stays mu (every step maps E[x_t] = sqrt(ab_t) mu to
    sqrt(ab_t') mu), and the std is the chain's closed form, off sd by a discretisation error
    that vanishes with the step size: below it for the posterior variance (0.39 for DDIM eta = 1
    with 20 linear steps, 0.49 with 500), above it for "beta" (0.54 with 25 linear steps, 0.502
    with 500). Noise of the wrong scale, or none, changes the std by 100 or more standard errors
    (measured with 0.7x the noise and with none)."""
    mu, sd = 0.2, 0.5
    _, ab_np = ref_alphas_cumprod(schedule)
    ab = torch.from_numpy(ab_np)
    model = GaussianOracle(mu, sd, ab)
    out = sample(model, NoiseScheduler(schedule=schedule), BIG, sampler=sampler, steps=steps, eta=eta,
                 variance=variance, clip_x0=False, generator=seeded(1))
    if sampler == "ddpm":
        expected_sd = ancestral_chain_std(ab_np, steps, variance, sd)
    else:
        expected_sd = ddim_chain_std(ab, steps, eta, sd)
    assert abs(out.mean().item() - mu) < five_se(expected_sd)
    assert abs(out.std().item() - expected_sd) < five_se(expected_sd * 2**-0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ode_solvers_converge_with_their_order(schedule):
    """Error to the exact ODE state at t = 27, visited by the 38-, 112- and 334-step
    schedules (spacings 27, 9, 3): dividing the step by 3 divides the error by about 3
    for DDIM (first order) and 9 for DPM-Solver++(2M) (second order)."""
    ab = ref_ab(schedule)
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
    ab = ref_ab(schedule)
    model = GaussianOracle(0.2, 0.5, ab)
    exact = model.ode_endpoint(x_T(3))

    def error(sampler, steps):
        out = sample(model, NoiseScheduler(schedule=schedule), SHAPE, sampler=sampler, steps=steps,
                     clip_x0=False, generator=seeded(3))
        return (out.double() - exact).abs().max().item()

    assert error("dpm++2m", 20) < error("ddim", 50) < 0.1
    assert error("dpm++2m", 100) < 0.005


def test_ddim_eta0_is_deterministic_given_x_T():
    model = GaussianOracle(0.2, 0.5, ref_ab("linear"))
    g = seeded(5)
    out = sample(model, NoiseScheduler(), SHAPE, sampler="ddim", steps=200, clip_x0=False, generator=g)
    # Only x_T was drawn: the generator is exactly one randn(SHAPE) further along.
    reference = seeded(5)
    reference_x_T = torch.randn(SHAPE, generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())
    # The result is a function of x_T alone (here the exact ODE map, up to discretisation).
    assert (out.double() - model.ode_endpoint(reference_x_T)).abs().max().item() < 0.05


# ----------------------------------------------------------- loop bookkeeping


def test_respaced_ddpm_with_the_posterior_variance_is_ddim_with_eta_1():
    """Dispatch only: "ddpm" with the posterior variance is the DDIM eta = 1 rule, written
    differently: up to float32 rounding (DDIM's sqrt(1 - ab' - sigma^2) cancels at large t, 3e-6
    measured here on the linear schedule). Whether the rule samples the right distribution is
    checked on the point and Gaussian oracles above."""
    model = GaussianOracle(0.2, 0.5, ref_ab("linear"))

    def run(sampler, eta=0.0, variance=None):
        return sample(model, NoiseScheduler(), SHAPE, sampler=sampler, steps=25, eta=eta, variance=variance,
                      generator=seeded(4))

    respaced = run("ddpm", variance="posterior")
    torch.testing.assert_close(respaced, run("ddim", eta=1.0), rtol=0, atol=2e-5)
    assert (respaced - run("ddpm", variance="beta")).abs().max() > 0.1


def test_default_variance():
    """"beta" for the full chain (Ho et al.), FEW_STEP_VARIANCE for a respaced one."""
    assert default_variance(1000, 1000) == "beta" and default_variance(10, 10) == "beta"
    assert default_variance(10, 1000) == default_variance(999, 1000) == FEW_STEP_VARIANCE
    assert FEW_STEP_VARIANCE in VARIANCES == ("beta", "posterior")
    model = GaussianOracle(0.2, 0.5, ref_ab("linear"))
    for steps, variance in ((25, FEW_STEP_VARIANCE), (1000, "beta")):
        runs = [sample(model, NoiseScheduler(), SHAPE, steps=steps, variance=v, generator=seeded(4))
                for v in (None, variance)]
        assert torch.equal(*runs), steps


def test_full_ddpm_calls_the_model_at_every_timestep_in_order():
    model = PointOracle(torch.zeros(SHAPE), ref_ab("linear"))
    sample(model, NoiseScheduler(), SHAPE, generator=seeded())
    assert len(model.calls) == 1000
    for expected, t in zip(range(999, -1, -1), model.calls):
        assert t.tolist() == [expected] * SHAPE[0]


@pytest.mark.parametrize(
    "sampler, steps", [("ddim", 1), ("ddim", 7), ("ddim", 50), ("ddpm", 25), ("dpm++2m", 2), ("dpm++2m", 20)]
)
def test_model_calls_equal_steps(sampler, steps):
    model = PointOracle(torch.zeros(SHAPE), ref_ab("linear"))
    sample(model, NoiseScheduler(), SHAPE, sampler=sampler, steps=steps, generator=seeded())
    assert [t[0].item() for t in model.calls] == timestep_schedule(1000, steps)


def test_default_steps():
    assert SAMPLERS == ("ddpm", "ddim", "dpm++2m") and set(DEFAULT_STEPS) == set(SAMPLERS)
    for sampler, expected_calls in [("ddim", 50), ("dpm++2m", 10), ("ddpm", 1000)]:  # README "Sample"
        model = PointOracle(torch.zeros(SHAPE), ref_ab("linear"))
        sample(model, NoiseScheduler(), SHAPE, sampler=sampler, generator=seeded())
        assert len(model.calls) == expected_calls
    # Small T: the default step count is capped at T.
    model = PointOracle(torch.zeros(SHAPE), ref_ab("cosine", T=10))
    sample(model, NoiseScheduler(timesteps=10, schedule="cosine"), SHAPE, sampler="ddim", generator=seeded())
    assert len(model.calls) == 10


@pytest.mark.parametrize(
    "sampler, steps, eta",
    [("ddpm", None, 0.0), ("ddpm", 10, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0), ("dpm++2m", 10, 0.0)],
)
def test_seeded_generator_reproduces_samples(sampler, steps, eta):
    scheduler = NoiseScheduler(timesteps=100)
    model = GaussianOracle(0.0, 0.5, ref_ab("linear", T=100))
    kwargs = dict(sampler=sampler, steps=steps, eta=eta)
    a = sample(model, scheduler, SHAPE, generator=seeded(11), **kwargs)
    b = sample(model, scheduler, SHAPE, generator=seeded(11), **kwargs)
    c = sample(model, scheduler, SHAPE, generator=seeded(12), **kwargs)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_low_precision_model_output_is_cast():
    model = PointOracle(torch.zeros(SHAPE), ref_ab("cosine", T=10))
    out = sample(lambda x, t: model(x, t).bfloat16(), NoiseScheduler(timesteps=10, schedule="cosine"), SHAPE,
                 generator=seeded())
    assert out.dtype == torch.float32


def test_progress_bar(capsys):
    model = PointOracle(torch.zeros(SHAPE), ref_ab("cosine", T=10))
    sample(model, NoiseScheduler(timesteps=10, schedule="cosine"), SHAPE, sampler="ddim", steps=5, progress=True,
           generator=seeded())
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
        ({"sampler": "ddpm", "variance": "learned"}, "variance must be one of"),
        ({"sampler": "ddim", "variance": "beta"}, "only used by the 'ddpm' sampler"),
    ],
)
def test_bad_arguments_raise_before_sampling(kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        sample(lambda x, t: calls.append(t) or x, NoiseScheduler(timesteps=10, schedule="cosine"), SHAPE, **kwargs)
    assert not calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_loop_has_no_host_device_sync(sampler):
    scheduler = NoiseScheduler(timesteps=50, device="cuda")
    ab = ref_ab("linear", T=50).cuda()
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


@pytest.mark.parametrize("sampler, steps", [("ddpm", 10), ("ddim", 20), ("dpm++2m", 10)])
def test_a_v_model_samples_what_the_eps_model_samples(sampler, steps):
    """A model trained with prediction "v" outputs v; the loop must turn it into the same noise
    the eps model would give. Gaussian data (an oracle that is not a point, so every step's
    x_t matters), the same seed: the two runs agree to float32 rounding."""
    ab = ref_ab("linear")
    eps_oracle = GaussianOracle(0.2, 0.5, ab)
    by_eps = sample(eps_oracle, NoiseScheduler(), SHAPE, sampler=sampler, steps=steps, generator=seeded())
    by_v = sample(v_of(eps_oracle, ab), NoiseScheduler(prediction="v"), SHAPE, sampler=sampler, steps=steps,
                  generator=seeded())
    torch.testing.assert_close(by_v, by_eps, rtol=0, atol=1e-4)
    wrong = sample(v_of(eps_oracle, ab), NoiseScheduler(), SHAPE, sampler=sampler, steps=steps, generator=seeded())
    assert (wrong - by_eps).abs().max() > 0.1  # the test sees a v output read as noise


# ------------------------------------------------------------ autoguidance (model A)


def test_run_autoguidance_is_the_runs_choice_else_the_default():
    """A checkpoint's training options decide the scale and the interval's lower bound; older
    ones (no such option) and runs without them get the defaults; 0 (the guide alone, or
    guidance from the noisiest step) is a choice, not a missing value."""
    default = (DEFAULT_AUTOGUIDANCE_SCALE, DEFAULT_AUTOGUIDANCE_MIN_SNR)
    assert default == (3.0, 0.0)
    assert run_autoguidance({}) == default
    assert run_autoguidance({"guidance_scale": None, "guidance_min_snr": None}) == default
    assert run_autoguidance({"guidance_scale": 4.0}) == (4.0, 0.0)
    assert run_autoguidance({"guidance_min_snr": 0.02}) == (3.0, 0.02)
    assert run_autoguidance({"guidance_scale": 0.0, "guidance_min_snr": 0.0}) == (0.0, 0.0)
    assert run_autoguidance({"guidance_scale": 5.0, "guidance_min_snr": 0.5}) == (5.0, 0.5)


def test_autoguidance_is_the_guide_plus_s_times_the_difference():
    """out = guide + s (model - guide), in float64 by hand, at every step when max_snr = inf;
    s = 1 is the model alone and never calls the guide."""
    gen = seeded(1)
    x, t = torch.randn(SHAPE, generator=gen), torch.full((SHAPE[0],), 100)
    main_out, guide_out = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    main, guide = (lambda x, t: main_out), (lambda x, t: guide_out)
    for s in (0.0, 2.0, 3.5):
        expected = guide_out.double() + s * (main_out.double() - guide_out.double())
        torch.testing.assert_close(autoguided_fn(main, guide, s, NoiseScheduler(), math.inf)(x, t).double(), expected,
                                   rtol=1e-6, atol=1e-6)

    def unused_guide(x, t):
        raise AssertionError("the guide ran")
    assert autoguided_fn(main, unused_guide, 1.0, NoiseScheduler()) is main


def test_autoguidance_acts_only_where_the_snr_is_within_its_interval():
    """The guidance interval: each sample of a batch is guided where its SNR(t) = ab_t / (1 - ab_t),
    from the papers' alpha bars in float64, lies in [min_snr, max_snr], and is the model's output
    exactly elsewhere. With the default upper bound 4 on the linear schedule that is t >= 145
    (SNR(144) = 4.009, SNR(145) = 3.950), with the lower bound 0.02 t <= 621 (SNR(621) = 0.02012,
    SNR(622) = 0.01987); a batch of steps outside it never calls the guide."""
    gen, shape = seeded(2), (4, 1, 8, 8)
    main_out, guide_out = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    main, guide = (lambda x, t: main_out), (lambda x, t: guide_out)
    ab = ref_ab("linear")
    snr = ab / (1 - ab)
    assert snr[144] > DEFAULT_AUTOGUIDANCE_MAX_SNR >= snr[145]  # the boundaries named above
    assert snr[621] >= 0.02 > snr[622]
    x = torch.randn(shape, generator=gen)
    guided = guide_out.double() + 3 * (main_out.double() - guide_out.double())
    cases = [((0, 144, 145, 999), 0.0, DEFAULT_AUTOGUIDANCE_MAX_SNR, (False, False, True, True)),
             ((0, 144, 145, 999), 0.0, 0.5, (False, False, False, True)),
             ((0, 144, 145, 999), 0.0, 0.0, (False, False, False, False)),
             ((0, 144, 145, 999), 0.0, math.inf, (True, True, True, True)),
             ((144, 145, 621, 622), 0.02, DEFAULT_AUTOGUIDANCE_MAX_SNR, (False, True, True, False)),
             ((0, 621, 622, 999), 0.02, math.inf, (True, True, False, False))]
    for steps, min_snr, max_snr, expected_inside in cases:
        t = torch.tensor(steps)  # (4,)
        inside = ((snr[t] >= min_snr) & (snr[t] <= max_snr)).view(-1, 1, 1, 1)
        assert inside.view(-1).tolist() == list(expected_inside)  # the float64 SNRs agree with the table
        expected = torch.where(inside, guided, main_out.double())
        out = autoguided_fn(main, guide, 3.0, NoiseScheduler(), max_snr, min_snr)(x, t)
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(out[~inside.view(-1)], main_out[~inside.view(-1)])  # the model's own output

    def unused_guide(x, t):
        raise AssertionError("the guide ran on steps outside the interval")
    clean, noisiest = torch.tensor([0, 10, 100, 144]), torch.tensor([622, 700, 888, 999])
    assert torch.equal(autoguided_fn(main, unused_guide, 3.0, NoiseScheduler())(x, clean), main_out)
    assert torch.equal(autoguided_fn(main, unused_guide, 3.0, NoiseScheduler(), min_snr=0.02)(x, noisiest), main_out)


@pytest.mark.parametrize("sampler, steps", [("ddpm", 10), ("dpm++2m", 10)])
def test_autoguided_v_models_sample_the_guided_noise(sampler, steps):
    """The weights 1 - s and s sum to one, so guiding two v models is guiding the noises they
    imply: on Gaussian-data oracles of different spread (the 'model' sharper than the 'guide'),
    the v pair sampled by generate_images matches the eps combination written by hand."""
    ab = ref_ab("linear")
    main, guide = GaussianOracle(0.2, 0.4, ab), GaussianOracle(0.2, 0.7, ab)

    class Net(torch.nn.Module):  # what generate_images needs of a model: its image shape
        channels, img_size = SHAPE[1], SHAPE[2]

        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x, t):
            return self.fn(x, t)

    snr = ab / (1 - ab)

    def guided_where(max_snr):
        """The eps combination on the steps with SNR(t) <= max_snr, the model's eps elsewhere."""
        def by_hand(x, t):
            inside = (snr[t] <= max_snr).view(-1, 1, 1, 1)
            return torch.where(inside, guide(x, t) + 2.5 * (main(x, t) - guide(x, t)), main(x, t))
        return by_hand

    samples = {}
    for max_snr in (DEFAULT_AUTOGUIDANCE_MAX_SNR, math.inf):
        samples[max_snr] = sample(guided_where(max_snr), NoiseScheduler(), SHAPE, sampler=sampler, steps=steps,
                                  generator=seeded())
        kwargs = {} if max_snr == DEFAULT_AUTOGUIDANCE_MAX_SNR else {"guidance_max_snr": max_snr}  # the default
        by_v = generate_images(Net(v_of(main, ab)), NoiseScheduler(prediction="v"), SHAPE[0],
                               guide=Net(v_of(guide, ab)), guidance_scale=2.5, sampler=sampler, steps=steps, **kwargs)
        torch.testing.assert_close(by_v, samples[max_snr], rtol=0, atol=1e-4)
    unguided = sample(main, NoiseScheduler(), SHAPE, sampler=sampler, steps=steps, generator=seeded())
    assert (samples[math.inf] - unguided).abs().max() > 0.05  # the guidance changes the samples
    # and so does leaving the last step (t = 111 -> 0 on 10 steps) to the model alone
    assert (samples[math.inf] - samples[DEFAULT_AUTOGUIDANCE_MAX_SNR]).abs().max() > 1e-3
