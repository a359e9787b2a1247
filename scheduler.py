"""DDPM noise schedule and the per-step update rules built on it.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):

    beta_t      noise added at step t, t = 0 .. T-1 (the paper's t = 1 .. T)
    alpha_t     = 1 - beta_t
    ab_t        = prod_{s <= t} alpha_s                   ("alpha bar")
    q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I)

Every per-step quantity is computed once in float64 and stored as a float32
tensor of shape (T,), indexed by t. The update rules (ancestral DDPM, DDIM,
DPM-Solver++(2M)) live here; the sampling loop that drives them is
sampling.py.
"""

import copy
import math
import numbers

import torch

SCHEDULES = ("linear", "cosine")
# What the network outputs: the noise eps (Ho et al.) or the velocity
# v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4).
PREDICTIONS = ("eps", "v")
# How training weighs each timestep's loss (training.training_step): "min_snr" by min(SNR_t, gamma)
# on the x0 error (Hang et al. 2023; gamma 0: every timestep the same), "p2" by SNR_t / (1 + SNR_t)
# on it (Choi et al. 2022, with k = gamma = 1).
LOSS_WEIGHTINGS = ("min_snr", "p2")
# The linear schedule's beta_start and beta_end are given for this many steps (Ho et al.:
# 1e-4 and 0.02 at T = 1000) and scaled by LINEAR_REFERENCE_TIMESTEPS / T for another T.
LINEAR_REFERENCE_TIMESTEPS = 1000


class ScheduleError(ValueError):
    """Schedule options that give no valid schedule; the message is one line naming them."""


def _compute_dtype(x):
    """Dtype the update math runs in: float64 for float64 inputs, float32 otherwise (bf16, fp16)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _linear_betas(timesteps, beta_start, beta_end):
    """Betas evenly spaced between the endpoints scaled to T steps (improved-diffusion's rule):

    beta_t = k beta_start + t / (T - 1) * k (beta_end - beta_start),  k = 1000 / T,  t = 0 .. T-1

    Why scale: sum_t beta_t = 1000 (beta_start + beta_end) / 2 then holds for every T >= 2, and
    since log(1 - b) <= -b, ab_{T-1} <= exp(-sum_t beta_t) = exp(-10.05) = 4.3e-5 for the default
    endpoints: the chain ends near N(0, I) whatever T. Unscaled, T = 100 would end at
    ab_{T-1} = 0.36 and sampling from N(0, I) would start far from q(x_{T-1}). k = 1 at T = 1000,
    so the default schedule is the paper's to the bit.
    """
    scale = LINEAR_REFERENCE_TIMESTEPS / timesteps
    start, end = scale * beta_start, scale * beta_end
    if not (0 < start < 1 and 0 < end < 1):
        largest = max(beta_start, beta_end)
        hint = (f"; use timesteps >= {math.floor(LINEAR_REFERENCE_TIMESTEPS * largest) + 1} or schedule='cosine'"
                if min(beta_start, beta_end) > 0 else "")
        raise ScheduleError(
            f"the linear schedule's betas must lie in (0, 1), but beta_start={beta_start} and beta_end={beta_end} "
            f"(given for T={LINEAR_REFERENCE_TIMESTEPS}) become {start:g} and {end:g} at timesteps={timesteps}{hint}"
        )
    return torch.linspace(start, end, timesteps, dtype=torch.float64)  # (T,)


def _cosine_betas(timesteps, s=0.008):
    """Nichol & Dhariwal 2021, "Improved DDPM", eq. 17.

    ab(t) = f(t) / f(0),  f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)
    beta_t = 1 - ab(t + 1) / ab(t), clipped at 0.999 (the last step would be 1)
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)  # (T,)


def _schedule_tables(betas, alphas_cumprod):
    """Every per-step table of a chain, float64 (K,) each, from its betas and alpha bars.

    alphas_cumprod is taken, not recomputed from the betas, so that a respaced chain keeps the
    full schedule's alpha bars exactly.
    """
    alphas = 1 - betas  # alpha_t = 1 - beta_t
    # ab_{t-1}, with ab_{-1} = 1 (nothing noised before the first step)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        # q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I)
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        # 1 / sqrt(alpha_t), from the reverse mean (Ho et al. eq. 11)
        "sqrt_recip_alphas": alphas.rsqrt(),
        # q(x_{t-1} | x_t, x0) = N(coef1_t x0 + coef2_t x_t, beta~_t I)   (Ho et al. eq. 6-7)
        # beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t)
        "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        # coef1_t = beta_t sqrt(ab_{t-1}) / (1 - ab_t)          (multiplies x0)
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        # coef2_t = sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t)   (multiplies x_t)
        "posterior_mean_coef2": alphas.sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        # lambda_t = log(alpha_t / sigma_t) = 1/2 log(ab_t / (1 - ab_t)), the half
        # log-SNR that DPM-Solver steps in (Lu et al. 2022)
        "lambdas": 0.5 * (alphas_cumprod.log() - torch.log1p(-alphas_cumprod)),
        # signal-to-noise ratio of q(x_t | x0): SNR_t = ab_t / (1 - ab_t)
        "snr": alphas_cumprod / (1 - alphas_cumprod),
    }


class NoiseScheduler:
    """Fixed variance schedule of a DDPM and its forward / reverse steps.

    Args:
        timesteps: number of diffusion steps T.
        beta_start, beta_end: first and last beta of the "linear" schedule at
            T = 1000 (Ho et al.: 1e-4 and 0.02); for another T both are scaled by
            1000 / T, so that every T ends near pure noise. Unused by "cosine",
            which is fully determined by T.
        schedule: "linear" (betas evenly spaced from beta_start to beta_end) or
            "cosine" (Nichol & Dhariwal 2021).
        prediction: what the model outputs, "eps" or "v" (PREDICTIONS). Training regresses
            `training_target`; samplers turn the output into noise with `noise_from_prediction`.
        device: where the per-step tensors live.

    Timesteps are 0-based: t = 0 is the first noising step and t = T-1 the
    last. Methods taking `t` accept a python int or a (B,) integer tensor (one
    timestep per sample); math runs in float32 (float64 for float64 inputs)
    and results come back in the input's dtype and device.
    """

    _TENSORS = (
        "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev",
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas",
        "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2", "lambdas", "snr",
    )

    def __init__(self, timesteps=1000, beta_start=1e-4, beta_end=0.02, schedule="linear", prediction="eps",
                 device="cpu"):
        if schedule not in SCHEDULES:
            raise ScheduleError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
        if prediction not in PREDICTIONS:
            raise ScheduleError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        if not isinstance(timesteps, numbers.Integral) or timesteps < 1:
            raise ScheduleError(f"timesteps must be an integer >= 1, got {timesteps!r}")
        if schedule == "linear":
            betas = _linear_betas(int(timesteps), beta_start, beta_end)
        else:
            betas = _cosine_betas(int(timesteps))  # in (0, 0.999] for every T
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # ab_t = prod_{s<=t} alpha_s
        self.beta_start, self.beta_end, self.schedule, self.prediction = beta_start, beta_end, schedule, prediction
        self._config = {"timesteps": int(timesteps), "beta_start": beta_start, "beta_end": beta_end,
                        "schedule": schedule, "prediction": prediction}
        self._set_tables(betas, alphas_cumprod, torch.arange(int(timesteps)), device)

    def _set_tables(self, betas, alphas_cumprod, timesteps, device):
        """Store every per-step table from the float64 (K,) betas and alpha bars of a chain whose
        step k runs from the model's timestep timesteps[k] to timesteps[k-1] (-1 at k = 0)."""
        self.num_timesteps = len(betas)
        self.timesteps = timesteps  # (K,) int64 on the CPU; arange(T) for the full schedule
        self._betas64, self._alphas_cumprod64 = betas, alphas_cumprod  # kept for respaced()
        tensors = _schedule_tables(betas, alphas_cumprod)
        self.device = torch.device(device)
        for name in self._TENSORS:
            setattr(self, name, tensors[name].to(device=self.device, dtype=torch.float32))

    def respaced(self, timesteps):
        """The chain that visits only `timesteps`, as a NoiseScheduler of K = len(timesteps) steps
        (Nichol & Dhariwal 2021, sec. 4).

        With s_0 < s_1 < ... < s_{K-1} the timesteps sorted and s_{-1} = -1 (ab_{-1} = 1), step k
        of the new chain jumps from s_k to s_{k-1}; it keeps the marginals q(x_{s_k} | x0) and
        takes the betas that make its product of alphas reach them:

            ab'_k   = ab_{s_k}
            beta'_k = 1 - ab_{s_k} / ab_{s_{k-1}}

        Every other table follows from these as in the full schedule, so the new chain's
        sample_prev_image_distribution(x, k, ...) is the ancestral step s_k -> s_{k-1} with
        variance "beta" (sigma^2 = beta'_k) or "posterior" (sigma^2 = beta'_k (1 - ab'_{k-1}) /
        (1 - ab'_k)). Where s_{k-1} = s_k - 1 the jump is one step of the full chain and beta'_k
        is beta_{s_k} itself (the ratio equals it only up to rounding), so respacing to all T
        timesteps gives back this schedule to the bit. The result's `timesteps` holds s_k: the
        timestep the model is called with at step k. Its `config` is this schedule's.
        """
        s = sorted(int(t) for t in timesteps)
        if not s or len(set(s)) != len(s) or s[0] < 0 or s[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must be distinct integers in [0, {self.num_timesteps - 1}], "
                             f"got {list(timesteps)!r}")
        k = torch.tensor(s)  # (K,) the steps kept, increasing
        alphas_cumprod = self._alphas_cumprod64[k]  # ab'_k = ab_{s_k}
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])  # ab'_{k-1}
        k_prev = torch.cat([k.new_full((1,), -1), k[:-1]])
        betas = torch.where(k_prev == k - 1, self._betas64[k], 1 - alphas_cumprod / alphas_cumprod_prev)
        chain = copy.copy(self)  # the same schedule options and config; its tables replaced below
        chain._set_tables(betas, alphas_cumprod, self.timesteps[k], self.device)
        return chain

    @property
    def config(self):
        """Plain dict that rebuilds this schedule: NoiseScheduler(**config, device=...); for a
        respaced chain, the full schedule it was respaced from."""
        return dict(self._config)

    def to(self, device):
        """Move every per-step tensor to `device`; returns self."""
        self.device = torch.device(device)
        for name in self._TENSORS:
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        full = f"NoiseScheduler({args}, device={str(self.device)!r})"
        if self.num_timesteps == self._config["timesteps"]:
            return full
        return f"{full}.respaced({self.timesteps.tolist()})"

    # ------------------------------------------------------------------ helpers

    def _check_t(self, t):
        if not isinstance(t, numbers.Integral) or not 0 <= t < self.num_timesteps:
            raise ValueError(f"t must be an integer in [0, {self.num_timesteps - 1}], got {t!r}")

    def _coef(self, values, t, x):
        """values[t] shaped to broadcast against x (B, C, H, W), on x's device.

        t: python int -> 0-dim tensor; (B,) integer tensor on any device ->
        (B, 1, 1, 1). Tensor timesteps are not range-checked, which would need
        a host-device sync.
        """
        if isinstance(t, torch.Tensor):
            out = values[t.to(values.device)].reshape(-1, *([1] * (x.dim() - 1)))
        else:
            self._check_t(t)
            out = values[int(t)]
        return out.to(device=x.device, dtype=_compute_dtype(x))

    def _keep_noise(self, t, x):
        """1 where t > 0 and 0 where t == 0, shaped like _coef: the last step adds no noise."""
        if isinstance(t, torch.Tensor):
            keep = (t.to(x.device) != 0).reshape(-1, *([1] * (x.dim() - 1)))
            return keep.to(_compute_dtype(x))
        return float(t != 0)

    # ----------------------------------------------------------------- training

    def sample_timesteps(self, batch_size, device=None, generator=None, weights=None):
        """(B,) int64 timesteps from {0, ..., T-1}: uniform, or with P(t) = weights[t] / sum(weights)
        for a (T,) tensor of non-negative `weights`."""
        device = self.device if device is None else device
        if weights is None:
            return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return torch.multinomial(weights.float(), batch_size, replacement=True, generator=generator).to(device)

    def noise_image(self, x0, t, noise=None):
        """Sample the forward process q(x_t | x0) in closed form (Ho et al. eq. 4).

        x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise,   noise ~ N(0, I)

        Returns (x_t, noise), both with x0's shape and dtype; `noise` is the
        tensor that was used (drawn with randn_like(x0) when not given).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        a = self._coef(self.sqrt_alphas_cumprod, t, x0)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0)
        x_t = a * x0.to(a.dtype) + s * noise.to(a.dtype)
        return x_t.to(x0.dtype), noise

    def training_target(self, x0, noise, t):
        """What the model learns to output for x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise:
        "eps": the noise itself; "v": v = sqrt(ab_t) noise - sqrt(1 - ab_t) x0."""
        if self.prediction == "eps":
            return noise
        a = self._coef(self.sqrt_alphas_cumprod, t, x0)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return (a * noise.to(a.dtype) - s * x0.to(a.dtype)).to(x0.dtype)

    def min_snr_weights(self, t, gamma):
        """(B,) float32 min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training
        via Min-SNR Weighting Strategy", eq. 7 and sec. 3.4).

        Each step's loss, written as an error on x0, is weighted by min(SNR_t, gamma): the
        low-noise steps, which are easy and whose gradients conflict with the others', stop
        dominating. The model's own loss already carries a factor of the x0 error
        (||eps - eps_hat||^2 = SNR_t ||x0 - x0_hat||^2, ||v - v_hat||^2 = (SNR_t + 1) ||x0 - x0_hat||^2),
        so its weight is min(SNR_t, gamma) / SNR_t for "eps" and min(SNR_t, gamma) / (SNR_t + 1) for "v".
        """
        return self._weights_of_x0_error(t, lambda snr: snr.clamp(max=gamma))

    def p2_weights(self, t):
        """(B,) float32 P2 loss weights (Choi et al. 2022, "Perception Prioritized Training of
        Diffusion Models", eq. 8 with k = 1 and gamma = 1).

        The noise error is weighted by 1 / (k + SNR_t)^gamma = 1 / (1 + SNR_t), i.e. the x0 error by
        SNR_t / (1 + SNR_t): min-SNR's SNR_t on the noisy steps (SNR_t << 1), where a sample's shape
        is decided (the paper's "content" stage, SNR 1e-2 to 1), but levelling off at 1 on the
        nearly clean ones, where min-SNR-5 gives up to 5. As for min_snr_weights, the model's own
        loss already carries SNR_t ("eps") or SNR_t + 1 ("v") times the x0 error, so the weight
        is 1 / (1 + SNR_t) for "eps" and SNR_t / (1 + SNR_t)^2 for "v".
        """
        return self._weights_of_x0_error(t, lambda snr: snr / (1 + snr))

    def _weights_of_x0_error(self, t, x0_weight):
        """(B,) float32 weights on this model's own loss that weigh its x0 error by x0_weight(SNR_t):
        that loss is SNR_t ("eps") or SNR_t + 1 ("v") times the x0 error, so divide by it."""
        snr = self.snr[t.to(self.snr.device)]
        own_factor = snr if self.prediction == "eps" else snr + 1
        return (x0_weight(snr) / own_factor).to(t.device)

    # ----------------------------------------------------------------- sampling

    def noise_from_prediction(self, x_t, t, output):
        """The noise a model output implies: "eps": the output itself;
        "v": eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v  (x_t = a x0 + s eps, v = a eps - s x0, a^2 + s^2 = 1).
        Affine in the output, so classifier-free guidance may mix v predictions as it mixes eps."""
        if self.prediction == "eps":
            return output
        a = self._coef(self.sqrt_alphas_cumprod, t, x_t)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return (s * x_t.to(a.dtype) + a * output.to(a.dtype)).to(output.dtype)

    def predict_x0(self, x_t, t, pred_noise):
        """Invert the forward process: x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)."""
        a = self._coef(self.sqrt_alphas_cumprod, t, x_t)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        x0_hat = (x_t.to(a.dtype) - s * pred_noise.to(a.dtype)) / a
        return x0_hat.to(x_t.dtype)

    def sample_prev_image_distribution(self, x_t, t, pred_noise, noise=None, variance="beta", clip_x0=True):
        """One ancestral DDPM step: draw x_{t-1} ~ p(x_{t-1} | x_t) = N(mean, sigma_t^2 I).

        clip_x0=False: the paper's mean (Ho et al. eq. 11)
            mean = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - ab_t) * eps)
        clip_x0=True: the same mean written through the implied clean image,
            x0_hat = clamp((x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), -1, 1)
            mean   = coef1_t x0_hat + coef2_t x_t          (posterior mean of q(x_{t-1} | x_t, x0))
        The two agree whenever the clamp changes nothing. Clipping is the
        default because Ho et al.'s sampler clips x0_hat to the data range
        [-1, 1], which removes the out-of-range drift of early, noisy steps.

        variance: "beta" -> sigma_t^2 = beta_t (default; the paper's choice,
        optimal for x0 ~ N(0, I)) or "posterior" -> sigma_t^2 = beta~_t
        (optimal for a single fixed x0).

        x_{t-1} = mean + sigma_t z with z = `noise` (randn_like when None);
        no noise is added where t == 0 (per sample for a tensor t).
        """
        if variance == "beta":
            var_table = self.betas
        elif variance == "posterior":
            var_table = self.posterior_variance
        else:
            raise ValueError(f"unknown variance {variance!r}; expected 'beta' or 'posterior'")
        x = x_t.to(_compute_dtype(x_t))
        eps = pred_noise.to(x.dtype)
        if clip_x0:
            x0_hat = self.predict_x0(x, t, eps).clamp(-1, 1)
            coef1, coef2 = self._coef(self.posterior_mean_coef1, t, x), self._coef(self.posterior_mean_coef2, t, x)
            mean = coef1 * x0_hat + coef2 * x
        else:
            eps_coef = self._coef(self.betas, t, x) / self._coef(self.sqrt_one_minus_alphas_cumprod, t, x)
            mean = self._coef(self.sqrt_recip_alphas, t, x) * (x - eps_coef * eps)
        if noise is None:
            noise = torch.randn_like(x)
        sigma = self._coef(var_table, t, x).sqrt()
        x_prev = mean + self._keep_noise(t, x) * sigma * noise.to(x.dtype)
        return x_prev.to(x_t.dtype)

    def _check_pair(self, t, t_prev):
        """Validate python-int timesteps of a jump t -> t_prev, where t_prev = -1 is the clean image."""
        self._check_t(t)
        if not isinstance(t_prev, numbers.Integral) or not -1 <= t_prev < t:
            raise ValueError(f"t_prev must be an integer in [-1, t - 1] = [-1, {t - 1}], got {t_prev!r}")

    def ddim_step(self, x_t, t, t_prev, pred_noise, eta=0.0, noise=None, clip_x0=True):
        """One DDIM step from timestep t to t_prev < t (Song et al. 2021, eq. 12 and 16).

        t, t_prev: python ints; t_prev = -1 means ab_prev = 1, the jump to the
        clean image. With ab = ab_t and ab' = ab_{t_prev}:

            x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
            sigma  = eta * sqrt((1 - ab') / (1 - ab)) * sqrt(1 - ab / ab')
            x_prev = sqrt(ab') x0_hat + sqrt(1 - ab' - sigma^2) eps + sigma z

        With clip_x0, x0_hat is clamped to [-1, 1] and eps re-derived from it,
        eps = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab), so both terms describe the
        same x_t (the step stays on the line through x_t and the clamped x0_hat).

        eta = 0 is the deterministic DDIM sampler; eta = 1 is ancestral
        sampling with the posterior variance of the respaced chain.
        z = `noise` (randn_like when None; unused when eta == 0).
        """
        self._check_pair(t, t_prev)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        x = x_t.to(_compute_dtype(x_t))
        eps = pred_noise.to(x.dtype)
        a = self._coef(self.sqrt_alphas_cumprod, t, x)
        s = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x)
        ab = self._coef(self.alphas_cumprod, t, x)
        ab_prev = self._coef(self.alphas_cumprod_prev, t_prev + 1, x)  # ab_{t_prev}; 1 at t_prev = -1

        x0_hat = self.predict_x0(x, t, eps)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - a * x0_hat) / s
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        dir_coef = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()  # clamp: float error at eta = 1
        x_prev = ab_prev.sqrt() * x0_hat + dir_coef * eps
        if eta > 0:
            if noise is None:
                noise = torch.randn_like(x)
            x_prev = x_prev + sigma * noise.to(x.dtype)
        return x_prev.to(x_t.dtype)

    def dpm_solver_step(self, x_t, t, t_prev, x0_hat, last_x0_hat=None, t_last=None):
        """One DPM-Solver++(2M) step from timestep t to t_prev < t (Lu et al. 2022, Alg. 2).

        Data-prediction multistep solver of the diffusion ODE, written with
        alpha_s = sqrt(ab_s), sigma_s = sqrt(1 - ab_s), lambda_s = log(alpha_s / sigma_s)
        and h = lambda_{t_prev} - lambda_t:

            first order (last_x0_hat is None; this is DDIM with eta = 0):
                x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h) - 1) x0_hat
            second order, reusing the model's x0 prediction at the previous
            evaluated timestep t_last > t, with r = h_last / h and
            h_last = lambda_t - lambda_{t_last}:
                D      = (1 + 1/(2r)) x0_hat - 1/(2r) last_x0_hat
                x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h) - 1) D

        t_prev = -1 (sigma = 0, lambda = inf) returns x0_hat: the final jump to
        the clean image. t, t_prev, t_last are python ints.
        """
        self._check_pair(t, t_prev)
        if (last_x0_hat is None) != (t_last is None):
            raise ValueError("last_x0_hat and t_last must be given together")
        if t_prev == -1:
            return x0_hat
        x = x_t.to(_compute_dtype(x_t))
        d = x0_hat.to(x.dtype)
        lam_t = self._coef(self.lambdas, t, x)
        h = self._coef(self.lambdas, t_prev, x) - lam_t
        if last_x0_hat is not None:
            if not t < t_last < self.num_timesteps:
                raise ValueError(f"t_last must be in [{t + 1}, {self.num_timesteps - 1}], got {t_last}")
            r = (lam_t - self._coef(self.lambdas, t_last, x)) / h
            d = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * last_x0_hat.to(x.dtype)
        sigma_ratio = self._coef(self.sqrt_one_minus_alphas_cumprod, t_prev, x) / self._coef(
            self.sqrt_one_minus_alphas_cumprod, t, x
        )
        alpha_prev = self._coef(self.sqrt_alphas_cumprod, t_prev, x)
        x_prev = sigma_ratio * x - alpha_prev * torch.expm1(-h) * d
        return x_prev.to(x_t.dtype)
