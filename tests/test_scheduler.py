"""NoiseScheduler against numbers derived independently of it: hand-derived
constants, float64 numpy recomputations and Gaussian-conditioning identities."""

import math

import numpy as np
import pytest
import torch

from scheduler import NoiseScheduler, ScheduleError
from tests.conftest import ref_alphas_cumprod

T = 1000


def np_(x):
    return x.detach().double().cpu().numpy()


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- the tables


def test_linear_schedule_golden_values():
    s = NoiseScheduler()
    # beta_t = 1e-4 + t (0.02 - 1e-4) / 999
    beta_500 = 1e-4 + 500 * (0.02 - 1e-4) / 999
    np.testing.assert_allclose(np_(s.betas[[0, 500, 999]]), [1e-4, beta_500, 0.02], rtol=1e-6)
    # Reference values from exact decimal arithmetic (40 digits) of ab_t = prod (1 - beta_s):
    ab = [0.9999, 7.7796658365e-2, 4.0358297654e-5]
    np.testing.assert_allclose(np_(s.alphas_cumprod[[0, 500, 999]]), ab, rtol=2e-5)
    # beta~_0 = 0 because ab_{-1} = 1; beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t) elsewhere.
    np.testing.assert_allclose(np_(s.posterior_variance[[500, 999]]), [1.0051335779e-2, 1.9999983527e-2], rtol=1e-5)
    assert s.posterior_variance[0].item() == 0.0
    # At t = 0 the posterior mean is x0 itself: coef1 = 1, coef2 = 0.
    coef1 = [1.0, 3.0580570756e-3, 1.2835148717e-4]
    coef2 = [0.0, 9.9410435076e-1, 9.8994867827e-1]
    np.testing.assert_allclose(np_(s.posterior_mean_coef1[[0, 500, 999]]), coef1, rtol=2e-5)
    np.testing.assert_allclose(np_(s.posterior_mean_coef2[[0, 500, 999]]), coef2, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np_(s.sqrt_alphas_cumprod[[500, 999]]), [2.7892052338e-1, 6.3528180876e-3], rtol=2e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_tables_match_float64_reference(schedule):
    s = NoiseScheduler(schedule=schedule)
    betas, ab = ref_alphas_cumprod(schedule)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    expected = {
        "betas": betas,
        "alphas": 1 - betas,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
        "sqrt_recip_alphas": 1 / np.sqrt(1 - betas),
        "posterior_variance": betas * (1 - ab_prev) / (1 - ab),
        "posterior_mean_coef1": betas * np.sqrt(ab_prev) / (1 - ab),
        "posterior_mean_coef2": np.sqrt(1 - betas) * (1 - ab_prev) / (1 - ab),
        "lambdas": np.log(np.sqrt(ab) / np.sqrt(1 - ab)),
    }
    for name, value in expected.items():
        table = getattr(s, name)
        assert table.dtype == torch.float32 and table.shape == (T,), name
        np.testing.assert_allclose(np_(table), value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_cosine_alpha_bar_closed_form():
    s = NoiseScheduler(timesteps=T, schedule="cosine")
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # Without clipping, ab at index t is f(t+1) / f(0); only the last beta (= 1) is clipped.
    for t in [0, 1, 250, 500, 750, 998]:
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5, abs=1e-9)
    assert s.betas[-1].item() == pytest.approx(0.999)
    assert s.alphas_cumprod[-1].item() == pytest.approx(f(T - 1) / f(0) * 0.001, rel=1e-4)


def test_default_linear_schedule_is_the_papers_to_the_bit():
    """At T = 1000 the 1000 / T scaling is a multiplication by 1.0: every table is what the
    unscaled float64 linspace(1e-4, 0.02, 1000) gives, rounded once to float32."""
    s = NoiseScheduler()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, dim=0)
    assert torch.equal(s.betas, betas.float())
    assert torch.equal(s.alphas_cumprod, ab.float())
    assert torch.equal(s.sqrt_alphas_cumprod, ab.sqrt().float())


def test_linear_schedule_scales_its_endpoints_by_1000_over_T():
    """beta_start and beta_end are given for T = 1000: at T = 100 the betas run from
    1e-4 * 10 = 1e-3 to 0.02 * 10 = 0.2, beta_t = 1e-3 + t (0.2 - 1e-3) / 99."""
    s = NoiseScheduler(timesteps=100)
    np.testing.assert_allclose(np_(s.betas[[0, 33, 99]]), [1e-3, 1e-3 + 33 * 0.199 / 99, 0.2], rtol=1e-6)
    betas, ab = ref_alphas_cumprod("linear", T=100, beta_start=1e-3, beta_end=0.2)
    np.testing.assert_allclose(np_(s.betas), betas, rtol=1e-6)
    np.testing.assert_allclose(np_(s.alphas_cumprod), ab, rtol=1e-5)
    # the 64-step schedule of other endpoints: k = 1000 / 64 = 15.625
    s = NoiseScheduler(timesteps=64, beta_start=2e-4, beta_end=0.03)
    np.testing.assert_allclose(np_(s.betas[[0, 63]]), [3.125e-3, 0.46875], rtol=1e-6)


# With endpoints scaled by 1000 / T, sum_t beta_t = T (k b0 + k b1) / 2 = 1000 (b0 + b1) / 2
# = 10.05 for every T, and log(1 - b) <= -b gives ab_{T-1} <= exp(-10.05) = 4.3e-5: x_{T-1} ~
# N(sqrt(ab) x0, (1 - ab) I) is then within a mean of sqrt(4.3e-5) = 0.0066 (for |x0| <= 1) and a
# variance of 4.3e-5 of the N(0, I) that sampling starts from. The cosine schedule clips its last
# beta at 0.999 (f(T) = cos^2(pi / 2) = 0), so ab_{T-1} <= 1 - 0.999 = 1e-3 there: a mean within
# 0.032. Unscaled, the linear schedule at T = 100 ends at ab = 0.36, far above both bounds.
PURE_NOISE_BOUND = {"linear": math.exp(-1000 * (1e-4 + 0.02) / 2), "cosine": 1e-3}


@pytest.mark.parametrize("schedule, smallest_T", [("linear", 21), ("cosine", 1)])
def test_every_allowed_T_ends_near_pure_noise(schedule, smallest_T):
    """Every T the schedule accepts, from the smallest (linear: 0.02 * 1000 / T < 1 needs
    T >= 21) to 1000, and a few longer chains."""
    for T in [*range(smallest_T, 1001), 1500, 4000]:
        s = NoiseScheduler(timesteps=T, schedule=schedule)
        assert s.alphas_cumprod[-1].item() <= PURE_NOISE_BOUND[schedule] * (1 + 1e-5), T
        assert (s.betas > 0).all() and (s.betas < 1).all(), T
        if schedule == "linear" and T > 1:
            assert s.betas.double().sum().item() == pytest.approx(10.05, rel=1e-6), T


@pytest.mark.parametrize("T", [1, 10, 20])
def test_linear_schedule_refuses_T_whose_betas_leave_0_1(T):
    """0.02 * 1000 / T >= 1 for T <= 20: one line naming the bound and the way out."""
    with pytest.raises(ScheduleError, match=r"\(0, 1\).*timesteps >= 21 or schedule='cosine'") as info:
        NoiseScheduler(timesteps=T)
    assert "\n" not in str(info.value)
    assert NoiseScheduler(timesteps=T, schedule="cosine").num_timesteps == T


def test_alphas_cumprod_prev_is_shifted_by_one():
    s = NoiseScheduler(timesteps=50)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_default_schedules_end_near_pure_noise(schedule):
    s = NoiseScheduler(schedule=schedule)
    assert s.num_timesteps == 1000
    assert s.sqrt_alphas_cumprod[-1].item() < 0.1
    assert (s.betas > 0).all() and (s.betas < 1).all()
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()


def test_config_roundtrip_and_to():
    s = NoiseScheduler(timesteps=64, beta_start=2e-4, beta_end=0.03, schedule="linear")
    config = s.config
    assert config == {"timesteps": 64, "beta_start": 2e-4, "beta_end": 0.03, "schedule": "linear",
                      "prediction": "eps"}
    rebuilt = NoiseScheduler(**config, device="cpu")
    assert torch.equal(rebuilt.betas, s.betas) and torch.equal(rebuilt.posterior_variance, s.posterior_variance)
    assert NoiseScheduler(**NoiseScheduler(schedule="cosine").config).schedule == "cosine"
    assert s.to("cpu") is s and s.betas.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": "quadratic"}, "unknown schedule"),
        ({"timesteps": 0}, "timesteps"),
        ({"beta_start": 0.0}, r"\(0, 1\)"),
        ({"beta_end": 1.5}, r"\(0, 1\)"),
        ({"beta_start": -1e-3}, r"\(0, 1\)"),
        ({"prediction": "x0"}, "unknown prediction"),
    ],
)
def test_invalid_schedule_arguments(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        NoiseScheduler(**kwargs)


def test_invalid_python_timesteps():
    s = NoiseScheduler(timesteps=10, schedule="cosine")
    x = torch.zeros(1, 1, 2, 2)
    for bad in (-1, 10, 2.5):
        with pytest.raises(ValueError, match=r"t must be an integer in \[0, 9\]"):
            s.noise_image(x, bad)
    with pytest.raises(ValueError, match="t_prev"):
        s.ddim_step(x, 3, 3, x)
    with pytest.raises(ValueError, match="t_prev"):
        s.ddim_step(x, 3, -2, x)
    with pytest.raises(ValueError, match="variance"):
        s.sample_prev_image_distribution(x, 3, x, variance="learned")
    with pytest.raises(ValueError, match="eta"):
        s.ddim_step(x, 3, 1, x, eta=-0.5)


def test_sample_timesteps_cover_the_range():
    s = NoiseScheduler(timesteps=5, schedule="cosine")
    t = s.sample_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and t.dtype == torch.int64
    assert t.min().item() == 0 and t.max().item() == 4
    assert torch.bincount(t, minlength=5).min().item() > 600  # ~800 each
    t2 = s.sample_timesteps(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)


def test_weighted_timesteps_are_drawn_in_proportion_to_their_weights():
    """P(t) = w_t / sum w: zero-weight timesteps never come up, and each count is within
    5 standard deviations of the binomial's n p (a wrong rule, e.g. uniform, misses by 100+)."""
    weights = torch.zeros(1000)
    weights[[3, 10, 500, 999]] = torch.tensor([1.0, 4.0, 2.0, 3.0])
    n = 50_000
    t = NoiseScheduler().sample_timesteps(n, generator=torch.Generator().manual_seed(0), weights=weights)
    assert t.shape == (n,) and t.dtype == torch.int64
    counts = torch.bincount(t, minlength=1000).double()
    assert set(t.unique().tolist()) == {3, 10, 500, 999}
    p = weights.double() / weights.sum()
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt()).all()


# ------------------------------------------------------------ forward process


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_noise_image_closed_form_per_sample_t(schedule):
    s = NoiseScheduler(schedule=schedule)
    _, ab = ref_alphas_cumprod(schedule)
    x0, noise = randn(4, 1, 3, 3, seed=1), randn(4, 1, 3, 3, seed=2)
    t = torch.tensor([0, 17, 500, 999])
    x_t, used = s.noise_image(x0, t, noise)
    assert used is noise and x_t.shape == x0.shape and x_t.dtype == torch.float32
    for row, tr in enumerate(t.tolist()):
        expected = math.sqrt(ab[tr]) * np_(x0[row]) + math.sqrt(1 - ab[tr]) * np_(noise[row])
        np.testing.assert_allclose(np_(x_t[row]), expected, rtol=1e-5, atol=1e-6)


def test_noise_image_int_t_and_drawn_noise():
    s = NoiseScheduler()
    _, ab = ref_alphas_cumprod("linear")
    x0 = randn(2, 3, 4, 4, seed=3)
    torch.manual_seed(0)
    x_t, noise = s.noise_image(x0, 250)
    assert noise.shape == x0.shape and noise.std().item() > 0.5  # actually drawn
    expected = math.sqrt(ab[250]) * np_(x0) + math.sqrt(1 - ab[250]) * np_(noise)
    np.testing.assert_allclose(np_(x_t), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float32])
def test_noise_image_keeps_dtype(dtype):
    s = NoiseScheduler()
    _, ab = ref_alphas_cumprod("linear")
    x0, noise = randn(2, 1, 4, 4, seed=4, dtype=dtype), randn(2, 1, 4, 4, seed=5, dtype=dtype)
    t = torch.tensor([10, 900])
    x_t, used = s.noise_image(x0, t, noise)
    assert x_t.dtype == dtype and used.dtype == dtype
    c = np.sqrt(ab[[10, 900]]).reshape(2, 1, 1, 1)
    expected = c * np_(x0) + np.sqrt(1 - c**2) * np_(noise)
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-7}[dtype]
    np.testing.assert_allclose(np_(x_t), expected, rtol=tol, atol=tol)


def test_predict_x0_inverts_the_forward_process():
    s = NoiseScheduler(schedule="cosine")
    x0, noise = randn(3, 1, 5, 5, seed=6), randn(3, 1, 5, 5, seed=7)
    t = torch.tensor([0, 400, 990])
    x_t, _ = s.noise_image(x0, t, noise)
    # Error scales like |noise| sqrt(1 - ab) / sqrt(ab) * float32 eps.
    torch.testing.assert_close(s.predict_x0(x_t, t, noise), x0, rtol=0, atol=5e-4)


# ---------------------------------------------------------- reverse process


def eq11(ab, betas, t, x_t, eps, var, z):
    """Ho et al. eq. 11 with sigma_t^2 = var, in numpy."""
    mean = (x_t - betas[t] / np.sqrt(1 - ab[t]) * eps) / np.sqrt(1 - betas[t])
    return mean + np.sqrt(var) * z


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ancestral_step_unclipped_is_eq11(variance):
    s = NoiseScheduler()
    betas, ab = ref_alphas_cumprod("linear")
    x_t, eps, z = randn(3, 1, 4, 4, seed=8), randn(3, 1, 4, 4, seed=9), randn(3, 1, 4, 4, seed=10)
    t = torch.tensor([3, 500, 999])
    out = s.sample_prev_image_distribution(x_t, t, eps, noise=z, variance=variance, clip_x0=False)
    for row, tr in enumerate(t.tolist()):
        var = betas[tr] if variance == "beta" else betas[tr] * (1 - ab[tr - 1]) / (1 - ab[tr])
        expected = eq11(ab, betas, tr, np_(x_t[row]), np_(eps[row]), var, np_(z[row]))
        np.testing.assert_allclose(np_(out[row]), expected, rtol=1e-5, atol=1e-5)
    # python int t
    out = s.sample_prev_image_distribution(x_t, 500, eps, noise=z, variance=variance, clip_x0=False)
    var = betas[500] if variance == "beta" else betas[500] * (1 - ab[499]) / (1 - ab[500])
    np.testing.assert_allclose(np_(out), eq11(ab, betas, 500, np_(x_t), np_(eps), var, np_(z)), rtol=1e-5, atol=1e-5)


def test_ancestral_step_is_the_gaussian_posterior():
    """With eps implied by a known x0, the clipped step samples q(x_{t-1} | x_t, x0).

    Independent derivation by Gaussian conditioning: x_{t-1} = sqrt(ab_{t-1}) x0 + sqrt(1 - ab_{t-1}) e1,
    x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e2, so given x0
        Cov(x_{t-1}, x_t) = sqrt(alpha_t) (1 - ab_{t-1}),  Var(x_t) = 1 - ab_t,
        mean = sqrt(ab_{t-1}) x0 + Cov / Var (x_t - sqrt(ab_t) x0),  var = (1 - ab_{t-1}) - Cov^2 / Var.
    """
    s = NoiseScheduler(schedule="cosine")
    betas, ab = ref_alphas_cumprod("cosine")
    x0 = randn(1, 1, 4, 4, seed=11).clamp(-0.9, 0.9)
    x_t, z = randn(1, 1, 4, 4, seed=12), randn(1, 1, 4, 4, seed=13)
    for t in [1, 100, 600, 998]:
        eps = (x_t - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t])
        cov, var_t = math.sqrt(1 - betas[t]) * (1 - ab[t - 1]), 1 - ab[t]
        mean = math.sqrt(ab[t - 1]) * np_(x0) + cov / var_t * (np_(x_t) - math.sqrt(ab[t]) * np_(x0))
        var = (1 - ab[t - 1]) - cov**2 / var_t
        for clip_x0 in (True, False):  # x0 inside [-1, 1]: clipping changes nothing
            out = s.sample_prev_image_distribution(x_t, t, eps, noise=z, variance="posterior", clip_x0=clip_x0)
            np.testing.assert_allclose(np_(out), mean + math.sqrt(var) * np_(z), rtol=1e-4, atol=1e-4)


def test_ancestral_step_clips_the_implied_x0():
    s = NoiseScheduler()
    betas, ab = ref_alphas_cumprod("linear")
    t = 300
    x_t, z = randn(2, 1, 4, 4, seed=14) * 3, randn(2, 1, 4, 4, seed=15)
    eps = randn(2, 1, 4, 4, seed=16)
    x0_hat = np.clip((np_(x_t) - np.sqrt(1 - ab[t]) * np_(eps)) / np.sqrt(ab[t]), -1, 1)
    assert (np.abs(x0_hat) == 1).any()  # the clamp is active
    coef1 = betas[t] * np.sqrt(ab[t - 1]) / (1 - ab[t])
    coef2 = np.sqrt(1 - betas[t]) * (1 - ab[t - 1]) / (1 - ab[t])
    mean = coef1 * x0_hat + coef2 * np_(x_t)
    out = s.sample_prev_image_distribution(x_t, t, eps, noise=z)  # defaults: clip, beta variance
    np.testing.assert_allclose(np_(out), mean + np.sqrt(betas[t]) * np_(z), rtol=1e-5, atol=1e-5)


def test_no_noise_at_t0_per_sample():
    s = NoiseScheduler()
    x_t, eps = randn(4, 1, 3, 3, seed=17), randn(4, 1, 3, 3, seed=18)
    z1, z2 = randn(4, 1, 3, 3, seed=19), randn(4, 1, 3, 3, seed=20)
    t = torch.tensor([0, 5, 0, 999])
    for variance in ("beta", "posterior"):
        for clip_x0 in (True, False):
            a = s.sample_prev_image_distribution(x_t, t, eps, noise=z1, variance=variance, clip_x0=clip_x0)
            b = s.sample_prev_image_distribution(x_t, t, eps, noise=z2, variance=variance, clip_x0=clip_x0)
            assert torch.equal(a[[0, 2]], b[[0, 2]])  # t = 0 rows ignore z
            assert not torch.allclose(a[[1, 3]], b[[1, 3]])  # the others do not
    a = s.sample_prev_image_distribution(x_t, 0, eps, noise=z1)
    assert torch.equal(a, s.sample_prev_image_distribution(x_t, 0, eps, noise=z2))
    assert torch.equal(a, s.sample_prev_image_distribution(x_t, 0, eps))


# ---------------------------------------------------------------- respacing


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_to_every_timestep_is_the_schedule_to_the_bit(schedule):
    s = NoiseScheduler(schedule=schedule)
    chain = s.respaced(range(T - 1, -1, -1))
    assert chain.num_timesteps == T and torch.equal(chain.timesteps, torch.arange(T))
    for name in NoiseScheduler._TENSORS:
        assert torch.equal(getattr(chain, name), getattr(s, name)), name


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_tables_closed_form(schedule):
    """Visiting s = 0, 1, 250, 999 (given in any order): step k jumps from s_k to s_{k-1}
    (s_{-1} = -1, ab_{-1} = 1) with beta'_k = 1 - ab_{s_k} / ab_{s_{k-1}}, so beta'_0 = beta_0 and
    beta'_1 = beta_1 (one-step jumps), and the posterior variance of the jump is
    beta'_k (1 - ab_{s_{k-1}}) / (1 - ab_{s_k})."""
    betas, ab = ref_alphas_cumprod(schedule)
    source = NoiseScheduler(schedule=schedule)
    chain = source.respaced([999, 0, 250, 1])
    s = [0, 1, 250, 999]
    assert chain.num_timesteps == 4 and chain.timesteps.tolist() == s
    assert source.num_timesteps == T and source.betas.shape == (T,)  # left as it was
    assert chain.config == source.config
    ab_k, ab_prev = ab[s], np.array([1.0, ab[0], ab[1], ab[250]])
    beta = 1 - ab_k / ab_prev
    np.testing.assert_allclose(beta[:2], betas[:2], rtol=1e-9)
    expected = {
        "betas": beta,
        "alphas_cumprod": ab_k,
        "alphas_cumprod_prev": ab_prev,
        "posterior_variance": beta * (1 - ab_prev) / (1 - ab_k),
        "posterior_mean_coef1": beta * np.sqrt(ab_prev) / (1 - ab_k),
        "posterior_mean_coef2": np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_k),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(np_(getattr(chain, name)), value, rtol=1e-5, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_respaced_step_is_the_gaussian_posterior_of_the_jump(variance):
    """Given x0, a jump t -> t' < t of the forward process is x_t' = sqrt(ab') x0 + sqrt(1 - ab') e1,
    x_t = sqrt(ab / ab') x_t' + sqrt(1 - ab / ab') e2, so by Gaussian conditioning
        Cov(x_t', x_t) = sqrt(ab / ab') (1 - ab'),  Var(x_t) = 1 - ab,
        mean = sqrt(ab') x0 + Cov / Var (x_t - sqrt(ab) x0),  var = (1 - ab') - Cov^2 / Var,
    the "posterior" step; the "beta" step has the same mean and variance 1 - ab / ab'. (Not
    t = 999 of the cosine schedule: there the float32 rounding of eps, over sqrt(ab) = 2e-4,
    moves x0_hat by 5e-4.)"""
    _, ab = ref_alphas_cumprod("cosine")
    timesteps = [0, 40, 333, 700, 998]
    chain = NoiseScheduler(schedule="cosine").respaced(timesteps)
    x0 = randn(1, 1, 4, 4, seed=40).clamp(-0.9, 0.9)
    x_t, z = randn(1, 1, 4, 4, seed=41), randn(1, 1, 4, 4, seed=42)
    for k in range(1, len(timesteps)):
        t, t_prev = timesteps[k], timesteps[k - 1]
        eps = (x_t - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t])
        cov, var_t = math.sqrt(ab[t] / ab[t_prev]) * (1 - ab[t_prev]), 1 - ab[t]
        mean = math.sqrt(ab[t_prev]) * np_(x0) + cov / var_t * (np_(x_t) - math.sqrt(ab[t]) * np_(x0))
        var = (1 - ab[t_prev]) - cov**2 / var_t if variance == "posterior" else 1 - ab[t] / ab[t_prev]
        out = chain.sample_prev_image_distribution(x_t, k, eps, noise=z, variance=variance)
        np.testing.assert_allclose(np_(out), mean + math.sqrt(var) * np_(z), rtol=1e-4, atol=1e-4, err_msg=str(t))


@pytest.mark.parametrize("timesteps", [[], [3, 3], [-1, 4], [0, 10]])
def test_respaced_refuses_bad_timesteps(timesteps):
    with pytest.raises(ValueError, match=r"distinct integers in \[0, 9\]"):
        NoiseScheduler(timesteps=10, schedule="cosine").respaced(timesteps)


def test_ddim_step_formula():
    s = NoiseScheduler()
    _, ab = ref_alphas_cumprod("linear")
    x_t, eps, z = randn(2, 1, 4, 4, seed=21), randn(2, 1, 4, 4, seed=22), randn(2, 1, 4, 4, seed=23)
    t, tp = 600, 580
    x0 = (np_(x_t) - np.sqrt(1 - ab[t]) * np_(eps)) / np.sqrt(ab[t])
    # eta = 0: x_prev = sqrt(ab') x0_hat + sqrt(1 - ab') eps, and z is unused
    out = s.ddim_step(x_t, t, tp, eps, eta=0.0, noise=z, clip_x0=False)
    np.testing.assert_allclose(np_(out), np.sqrt(ab[tp]) * x0 + np.sqrt(1 - ab[tp]) * np_(eps), rtol=1e-4, atol=1e-4)
    assert torch.equal(out, s.ddim_step(x_t, t, tp, eps, eta=0.0, clip_x0=False))
    # eta = 0.5
    sigma = 0.5 * np.sqrt((1 - ab[tp]) / (1 - ab[t])) * np.sqrt(1 - ab[t] / ab[tp])
    expected = np.sqrt(ab[tp]) * x0 + np.sqrt(1 - ab[tp] - sigma**2) * np_(eps) + sigma * np_(z)
    out = s.ddim_step(x_t, t, tp, eps, eta=0.5, noise=z, clip_x0=False)
    np.testing.assert_allclose(np_(out), expected, rtol=1e-4, atol=1e-4)


def test_ddim_eta1_consecutive_is_the_posterior_step():
    """DDIM with eta = 1 from t to t-1 samples q(x_{t-1} | x_t, x0_hat) (Song et al. sec. 4.1)."""
    s = NoiseScheduler()
    betas, ab = ref_alphas_cumprod("linear")
    x_t, eps, z = randn(2, 1, 4, 4, seed=24), randn(2, 1, 4, 4, seed=25), randn(2, 1, 4, 4, seed=26)
    t = 700
    x0 = (np_(x_t) - np.sqrt(1 - ab[t]) * np_(eps)) / np.sqrt(ab[t])
    cov, var_t = np.sqrt(1 - betas[t]) * (1 - ab[t - 1]), 1 - ab[t]
    mean = np.sqrt(ab[t - 1]) * x0 + cov / var_t * (np_(x_t) - np.sqrt(ab[t]) * x0)
    var = (1 - ab[t - 1]) - cov**2 / var_t
    out = s.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=z, clip_x0=False)
    np.testing.assert_allclose(np_(out), mean + np.sqrt(var) * np_(z), rtol=1e-4, atol=1e-4)


def test_ddim_step_clipping_and_final_jump():
    s = NoiseScheduler()
    _, ab = ref_alphas_cumprod("linear")
    x_t, eps = randn(2, 1, 4, 4, seed=27) * 2, randn(2, 1, 4, 4, seed=28)
    t, tp = 200, 100
    x0 = np.clip((np_(x_t) - np.sqrt(1 - ab[t]) * np_(eps)) / np.sqrt(ab[t]), -1, 1)
    assert (np.abs(x0) == 1).any()
    # eps re-derived from the clipped x0 so that x_prev lies on the line through x_t and x0
    eps_hat = (np_(x_t) - np.sqrt(ab[t]) * x0) / np.sqrt(1 - ab[t])
    out = s.ddim_step(x_t, t, tp, eps)
    np.testing.assert_allclose(np_(out), np.sqrt(ab[tp]) * x0 + np.sqrt(1 - ab[tp]) * eps_hat, rtol=1e-4, atol=1e-4)
    # t_prev = -1 lands on the (clipped) x0 prediction, also with eta > 0
    np.testing.assert_allclose(np_(s.ddim_step(x_t, t, -1, eps, eta=1.0)), x0, rtol=1e-5, atol=1e-5)


def test_dpm_solver_first_order_is_ddim():
    s = NoiseScheduler(schedule="cosine")
    _, ab = ref_alphas_cumprod("cosine")
    x_t, x0 = randn(2, 1, 4, 4, seed=29), randn(2, 1, 4, 4, seed=30).clamp(-1, 1)
    t, tp = 800, 700
    # (sigma'/sigma) x_t - alpha' (exp(-h) - 1) x0 = sqrt(ab') x0 + sqrt(1 - ab') (x_t - sqrt(ab) x0) / sqrt(1 - ab)
    eps = (np_(x_t) - np.sqrt(ab[t]) * np_(x0)) / np.sqrt(1 - ab[t])
    expected = np.sqrt(ab[tp]) * np_(x0) + np.sqrt(1 - ab[tp]) * eps
    np.testing.assert_allclose(np_(s.dpm_solver_step(x_t, t, tp, x0)), expected, rtol=1e-4, atol=1e-5)
    assert s.dpm_solver_step(x_t, 5, -1, x0) is x0


def test_dpm_solver_second_order_formula():
    s = NoiseScheduler()
    _, ab = ref_alphas_cumprod("linear")
    lam = 0.5 * np.log(ab / (1 - ab))
    x_t, x0, x0_last = randn(2, 1, 4, 4, seed=31), randn(2, 1, 4, 4, seed=32), randn(2, 1, 4, 4, seed=33)
    t_last, t, tp = 900, 850, 780
    h, h_last = lam[tp] - lam[t], lam[t] - lam[t_last]
    r = h_last / h
    d = (1 + 1 / (2 * r)) * np_(x0) - 1 / (2 * r) * np_(x0_last)
    expected = np.sqrt((1 - ab[tp]) / (1 - ab[t])) * np_(x_t) - np.sqrt(ab[tp]) * (np.exp(-h) - 1) * d
    out = s.dpm_solver_step(x_t, t, tp, x0, last_x0_hat=x0_last, t_last=t_last)
    np.testing.assert_allclose(np_(out), expected, rtol=1e-4, atol=1e-5)
    # Equal predictions at both timesteps: D = x0 and the step is first order.
    torch.testing.assert_close(s.dpm_solver_step(x_t, t, tp, x0, x0, t_last), s.dpm_solver_step(x_t, t, tp, x0))
    with pytest.raises(ValueError, match="together"):
        s.dpm_solver_step(x_t, t, tp, x0, last_x0_hat=x0_last)
    with pytest.raises(ValueError, match="t_last"):
        s.dpm_solver_step(x_t, t, tp, x0, x0_last, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_handling_without_syncs():
    x0 = randn(4, 1, 4, 4, seed=34).cuda()
    cpu = NoiseScheduler()
    x_t, _ = cpu.noise_image(x0, torch.tensor([0, 1, 2, 3]))  # scheduler and t on CPU, x on GPU
    assert x_t.device == x0.device
    gpu = NoiseScheduler(device="cuda")
    t = gpu.sample_timesteps(4)
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_t, noise = gpu.noise_image(x0, t)
        gpu.sample_prev_image_distribution(x_t, t, noise)
        gpu.ddim_step(x_t, 500, 400, noise, eta=1.0)
        gpu.dpm_solver_step(x_t, 500, 400, x0, x0, 600)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------ prediction targets and loss weights


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_target_and_the_noise_it_implies_closed_form(schedule):
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022), and from a v prediction the
    noise eps = sqrt(1 - ab) x_t + sqrt(ab) v, against float64 tables from the papers."""
    ab = torch.from_numpy(ref_alphas_cumprod(schedule, T)[1])
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    x0, noise = randn(6, 1, 4, 4, seed=1), randn(6, 1, 4, 4, seed=2)
    x_t = a * x0.double() + s * noise.double()
    v_ref = a * noise.double() - s * x0.double()

    v_sched = NoiseScheduler(schedule=schedule, prediction="v")
    torch.testing.assert_close(v_sched.training_target(x0, noise, t).double(), v_ref, rtol=0, atol=1e-6)
    eps = v_sched.noise_from_prediction(x_t.float(), t, v_ref.float())
    torch.testing.assert_close(eps.double(), noise.double(), rtol=0, atol=2e-6)

    eps_sched = NoiseScheduler(schedule=schedule)  # "eps": the target is the noise, the output is the noise
    assert torch.equal(eps_sched.training_target(x0, noise, t), noise)
    assert torch.equal(eps_sched.noise_from_prediction(x_t.float(), t, v_ref.float()), v_ref.float())


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_closed_form(schedule, prediction):
    """Hang et al. 2023: min(SNR, gamma) / SNR for an eps model, min(SNR, gamma) / (SNR + 1) for v."""
    ab = ref_alphas_cumprod(schedule, T)[1]
    snr = ab / (1 - ab)
    expected = np.minimum(snr, 5.0) / (snr if prediction == "eps" else snr + 1)
    weights = NoiseScheduler(schedule=schedule, prediction=prediction).min_snr_weights(torch.arange(T), 5.0)
    assert weights.shape == (T,) and weights.dtype == torch.float32
    np.testing.assert_allclose(np_(weights), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_p2_weights_closed_form(schedule, prediction):
    """Choi et al. 2022 with k = gamma = 1: the noise error weighs 1 / (1 + SNR), so an eps model's
    weight is 1 / (1 + SNR) and a v model's, whose error is (SNR + 1) / SNR times the noise
    error, SNR / (1 + SNR)^2. From the float64 schedule; the noisiest steps weigh as under min-SNR."""
    ab = ref_alphas_cumprod(schedule, T)[1]
    snr = ab / (1 - ab)
    expected = 1 / (1 + snr) if prediction == "eps" else snr / (1 + snr) ** 2
    scheduler = NoiseScheduler(schedule=schedule, prediction=prediction)
    weights = scheduler.p2_weights(torch.arange(T))
    assert weights.shape == (T,) and weights.dtype == torch.float32
    np.testing.assert_allclose(np_(weights), expected, rtol=2e-5, atol=0)
    noisy = torch.from_numpy(np.flatnonzero(snr < 1e-3))  # where min(SNR, 5) / (1 + SNR) ~ SNR / (1 + SNR)
    np.testing.assert_allclose(np_(weights[noisy]), np_(scheduler.min_snr_weights(noisy, 5.0)), rtol=2e-3)
