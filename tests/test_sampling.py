"""The sampling loop, driven by oracle models whose exact answers are known in
closed form (a single-image data set and a Gaussian data set)."""

import numpy as np
import pytest
import torch

from sampling import DEFAULT_STEPS, SAMPLERS, sample, timestep_schedule
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
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 25, 0.0), ("ddim", 50, 0.5), ("ddim", 20, 1.0)])
def test_stochastic_ddim_keeps_the_forward_marginals_of_a_point(schedule, sampler, steps, eta):
    """DDIM with any eta (and respaced "ddpm", which is eta = 1) is built so that, given the true
    x0, every x_t it visits is distributed as q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I) (Song
    et al. 2021, eq. 7 and Lemma 1). The point oracle knows x0 = x*, so at every visited t
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
                             steps=steps, eta=eta, generator=seeded(1), trajectory_at=range(1000))
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


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_full_ddpm_states_have_the_moments_of_its_markov_chain(schedule):
    """The full ancestral chain uses sigma_t^2 = beta_t (Ho et al. eq. 11), not the posterior
    variance, so its states are not exactly q(x_t | x*). With the point oracle each step is
    x_{t-1} = coef1_t x* + coef2_t x_t + sqrt(beta_t) n (eq. 6-7), so x_t ~ N(k_t x*, v_t) with
        k_{t-1} = coef1_t + coef2_t k_t,   v_{t-1} = coef2_t^2 v_t + beta_t,   k_{T-1} = 0, v_{T-1} = 1,
    and corr(x_t, x_{t-1}) = coef2_t sqrt(v_t / v_{t-1}); computed here in float64 from the
    papers' betas. Near t = 0 v_t exceeds 1 - ab_t (std 5% higher at t = 10, 36% at t = 0), so
    a chain drawn with the posterior variance fails, and so does one that adds no noise."""
    betas, ab = ref_alphas_cumprod(schedule)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
    coef2 = np.sqrt(1 - betas) * (1 - ab_prev) / (1 - ab)
    k, v = np.zeros(1000), np.ones(1000)
    for t in range(999, 0, -1):
        k[t - 1] = coef1[t] + coef2[t] * k[t]
        v[t - 1] = coef2[t] ** 2 * v[t] + betas[t]

    x_star = torch.rand(BIG[1:], generator=seeded(123)) * 1.8 - 0.9
    record = {*range(0, 40), *(s - d for s in range(999, 40, -64) for d in (0, 1))}
    _, trajectory = sample(PointOracle(x_star, torch.from_numpy(ab)), NoiseScheduler(schedule=schedule), BIG,
                           generator=seeded(1), trajectory_at=record)
    states = {t: (x.double() - k[t] * x_star) / v[t] ** 0.5 for t, x, _ in trajectory}  # N(0, 1) each
    assert set(states) == record
    for t, r in states.items():
        assert abs(r.mean().item()) < five_se(), t
        assert abs(r.std().item() - 1) < five_se(2**-0.5), t
        if t - 1 in states:
            expected = coef2[t] * (v[t] / v[t - 1]) ** 0.5
            assert abs(corr(r, states[t - 1]) - expected) < five_se(), t


# ------------------------------------------------------------ Gaussian oracle


@pytest.mark.parametrize("steps", [None, 500])
def test_ddpm_samples_the_gaussian_data_distribution(steps):
    """Full (steps None) and respaced (500 steps, DDIM with eta = 1) ancestral sampling reproduce
    N(0.2, 0.5^2). 16384 samples: standard errors are about 0.004 for the mean and 0.003 for the
    std. The discretisation shrinks the std of the respaced chain by 0.0075 at 500 steps (the
    closed form of the next test) and of the full chain by less than 0.001, hence 0.02."""
    ab = ref_ab("linear")
    model = GaussianOracle(0.2, 0.5, ab)
    out = sample(model, NoiseScheduler(), (16, 1, 32, 32), steps=steps, clip_x0=False, generator=seeded(1))
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


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 25, 0.0), ("ddpm", 100, 0.0), ("ddim", 50, 0.5),
                                                 ("ddim", 20, 1.0)])
def test_stochastic_samplers_give_the_exact_moments_on_gaussian_data(schedule, sampler, steps, eta):
    """Respaced ancestral sampling ("ddpm" with fewer steps = DDIM eta 1) and DDIM with eta > 0
    on N(0.2, 0.5^2) data with the exact model: the mean stays mu (every step maps E[x_t] =
    sqrt(ab_t) mu to sqrt(ab_t') mu), and the std is the chain's closed form, below sd by a
    discretisation error (0.39 for DDIM eta = 1 with 20 linear steps, 0.49 with 500) that
    vanishes with the step size. Noise of the wrong scale, or none, changes the std by 100 or
    more standard errors (measured with 0.7x the noise and with none)."""
    mu, sd = 0.2, 0.5
    ab = ref_ab(schedule)
    model = GaussianOracle(mu, sd, ab)
    out = sample(model, NoiseScheduler(schedule=schedule), BIG, sampler=sampler, steps=steps, eta=eta,
                 clip_x0=False, generator=seeded(1))
    expected_sd = ddim_chain_std(ab, steps, 1.0 if sampler == "ddpm" else eta, sd)
    # the closed form itself tends to the data's sd as the steps shrink (0.496-0.499 at 1000)
    assert abs(ddim_chain_std(ab, 1000, 1.0 if sampler == "ddpm" else eta, sd) - sd) < 0.005
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


def test_respaced_ddpm_is_ddim_with_eta_1():
    """Dispatch only: "ddpm" with fewer steps runs the DDIM eta = 1 rule. Whether that rule
    samples the right distribution is checked on the point and Gaussian oracles above."""
    model = GaussianOracle(0.2, 0.5, ref_ab("linear"))

    def run(sampler, eta=0.0):
        return sample(model, NoiseScheduler(), SHAPE, sampler=sampler, steps=25, eta=eta, generator=seeded(4))

    respaced = run("ddpm")
    assert torch.equal(respaced, run("ddim", eta=1.0))
    assert not torch.allclose(respaced, run("ddim"))


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
