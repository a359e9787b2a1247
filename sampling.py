"""The one sampling loop every script uses: ancestral DDPM, DDIM and DPM-Solver++(2M).

The update formulas live in scheduler.py; this file only picks the timesteps,
calls the model once per step and feeds its noise prediction to the matching
scheduler step.
"""

import numbers

import torch
from tqdm import tqdm

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
# Steps used when `steps` is None. None for "ddpm" means all T training steps.
# DPM-Solver++(2M) with 10 steps did as well as with 20 on four CPU-recipe checkpoints
# (1000 samples each; docs/results.md), in half the time.
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm++2m": 10}
VARIANCES = ("beta", "posterior")
# The "ddpm" sampler's variance on fewer than T steps. "beta" adds noise beta' = 1 - ab_t / ab_t'
# per jump, far more than the posterior's beta' (1 - ab_t') / (1 - ab_t) on long jumps: on 10
# linear steps the state at t = 0 has 35 times the noise std of q(x_t | x0) there (the closed
# form of tests/test_sampling.py), which the last step cannot remove. Measured on model B
# after 3 of the 9 epochs of its eps recipe (docs/results.md; 1000 digits, guidance 5, seed 0,
# bf16): 10 steps with "posterior" 85.6% per-digit accuracy, MNIST-FID 26.9;
# with "beta" 10.3%, FID 154 (997 of 1000 digits read as an 8: noise). After all 9 epochs:
# 100.0%, FID 6.5 against 37.1%, FID 88.
FEW_STEP_VARIANCE = "posterior"


def default_variance(steps, num_train_timesteps):
    """The "ddpm" sampler's variance when given none: "beta" for the full chain (Ho et al.),
    FEW_STEP_VARIANCE for a respaced one."""
    return "beta" if steps == num_train_timesteps else FEW_STEP_VARIANCE


def default_steps(sampler, num_train_timesteps):
    """The steps `sample` takes when given none: DEFAULT_STEPS[sampler], at most T."""
    default = DEFAULT_STEPS[sampler]
    return num_train_timesteps if default is None else min(default, num_train_timesteps)


def timestep_schedule(num_train_timesteps, steps):
    """`steps` evenly spaced timesteps, descending from T-1 to 0, without duplicates.

    t_i = round((T - 1) * (steps - 1 - i) / (steps - 1)), i = 0 .. steps-1, rounding
    halves up in exact integer arithmetic. steps == T gives T-1, ..., 0; steps == 1
    gives [T-1] (a single jump from pure noise to the clean image).
    """
    T = num_train_timesteps
    if not isinstance(steps, numbers.Integral) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the number of training timesteps), got {steps!r}")
    if steps == 1:
        return [T - 1]
    n = steps - 1
    return [((T - 1) * (n - i) * 2 + n) // (2 * n) for i in range(steps)]


@torch.inference_mode()
def sample(
    model_fn,
    scheduler,
    shape,
    *,
    sampler="ddpm",
    steps=None,
    eta=0.0,
    variance=None,
    clip_x0=True,
    generator=None,
    device="cpu",
    progress=False,
    trajectory_at=None,
):
    """Generate samples of `shape` (B, C, H, W) by reverse diffusion from x_T ~ N(0, I).

    Args:
        model_fn: (x_t, t) -> the model's output, x_t (B, C, H, W) float32 and t (B,) int64,
            both on `device`: the noise, or v for a scheduler with prediction "v". Its output is
            cast to float32 (it may run under autocast).
        scheduler: the NoiseScheduler the model was trained with (tensors on `device`).
        sampler: one of SAMPLERS.
            "ddpm": ancestral sampling (Ho et al. 2020) of the chain respaced to
                timestep_schedule(T, steps) (scheduler.respaced; all T steps: the full chain),
                with the per-step variance `variance` of that chain.
            "ddim": DDIM (Song et al. 2021) on timestep_schedule(T, steps), the last
                step jumping to the clean image; `eta` scales its noise (0 = deterministic).
            "dpm++2m": DPM-Solver++(2M) (Lu et al. 2022) on timestep_schedule(T, steps):
                second order, except first order on the first step and on the step
                into t = 0; the last step returns the x0 prediction at t = 0.
        steps: number of model calls; None -> DEFAULT_STEPS[sampler] (capped at T).
        eta: DDIM noise scale, >= 0; only the "ddim" sampler takes a non-zero eta.
        variance: the "ddpm" sampler's sigma^2 on the jump t -> t_prev, with
            beta' = 1 - ab_t / ab_{t_prev} (beta_t itself when t_prev = t - 1):
            "beta": sigma^2 = beta' (Ho et al.'s "fixed large");
            "posterior": sigma^2 = beta' (1 - ab_{t_prev}) / (1 - ab_t) ("fixed small"; the
                respaced chain's posterior variance, which makes the step DDIM with eta = 1).
            None -> default_variance(steps, T). Only the "ddpm" sampler takes it.
        clip_x0: clamp each step's x0 prediction to the data range [-1, 1].
        generator: torch.Generator on `device`; every random draw (x_T and the
            per-step noise) comes from it, so a seeded generator reproduces samples.
        progress: show a tqdm bar over the steps.
        trajectory_at: optional iterable of timesteps; the loop steps whose t is in
            it are recorded as (t, x_t, x0_hat). Timesteps the loop does not visit
            are skipped.

    Returns:
        x0 (B, C, H, W) float32, not clamped; or (x0, trajectory) when trajectory_at
        is given, trajectory being the list of (t, x_t, x0_hat) in sampling order.
    """
    T = scheduler.num_timesteps
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise ValueError(f"eta must be >= 0 and is only used by the 'ddim' sampler, got eta={eta} with {sampler!r}")
    if variance is not None and (variance not in VARIANCES or sampler != "ddpm"):
        raise ValueError(f"variance must be one of {VARIANCES} and is only used by the 'ddpm' sampler, "
                         f"got variance={variance!r} with {sampler!r}")
    if steps is None:
        steps = default_steps(sampler, T)
    timesteps = timestep_schedule(T, steps)  # validates steps
    if sampler == "ddpm":
        variance = default_variance(steps, T) if variance is None else variance
        chain = scheduler.respaced(timesteps)  # step k jumps from timesteps[K-1-k] to timesteps[K-k]
    capture = set() if trajectory_at is None else {int(t) for t in trajectory_at}

    batch_size = shape[0]
    x = torch.randn(shape, generator=generator, device=device)  # x_T
    trajectory = []
    last = (None, None)  # DPM-Solver++(2M) history: (x0_hat, t) of the previous model call
    # (k, t, t_prev): t_prev = -1 is the clean image; k = K-1 .. 0 is the step of the respaced chain
    jumps = zip(range(len(timesteps) - 1, -1, -1), timesteps, timesteps[1:] + [-1])
    # leave=None: the bar stays on screen unless it is nested under generate_images' bar
    for k, t, t_prev in tqdm(jumps, total=len(timesteps), desc=sampler, disable=not progress, leave=None):
        t_batch = torch.full((batch_size,), t, dtype=torch.long, device=device)  # (B,)
        eps = scheduler.noise_from_prediction(x, t_batch, model_fn(x, t_batch).float())  # (B, C, H, W)

        if sampler == "dpm++2m" or t in capture:
            x0_hat = scheduler.predict_x0(x, t, eps)
            if clip_x0:
                x0_hat = x0_hat.clamp(-1, 1)
            if t in capture:
                trajectory.append((t, x, x0_hat))

        if sampler == "ddpm":
            noise = torch.randn(shape, generator=generator, device=device)  # unused at t = 0
            x = chain.sample_prev_image_distribution(x, k, eps, noise=noise, variance=variance, clip_x0=clip_x0)
        elif sampler == "ddim":
            noise = torch.randn(shape, generator=generator, device=device) if eta > 0 else None
            x = scheduler.ddim_step(x, t, t_prev, eps, eta=eta, noise=noise, clip_x0=clip_x0)
        else:
            # First order on the first step (no history yet) and on the step into t = 0:
            # lambda jumps there, and extrapolating x0_hat linearly in lambda across the
            # jump overshoots (the "lower order final" of DPM-Solver implementations).
            history = (None, None) if t_prev == 0 else last
            x = scheduler.dpm_solver_step(x, t, t_prev, x0_hat, *history)
            last = (x0_hat, t)

    x = x.float()
    return (x, trajectory) if trajectory_at is not None else x


# ----------------------------------------------------------------------------------------
# From a trained model to images: what infer.py, infer_cfg.py, evaluate.py and the
# training previews call.

# Training previews show a model early in training, when the ODE samplers read worst. At the
# same cost (10 model calls; 1000 digits, guidance 5, seed 0), respaced ancestral DDPM with the
# posterior variance against DPM-Solver++(2M): 79.3% vs 69.8% per-digit accuracy on a weakly
# trained default-size model B (docs/results.md), 85.6% vs 79.3% (MNIST-FID 26.9 vs 29.4)
# on model B after 3 of the 9 epochs of its eps recipe. Its fresh noise at each step
# corrects part of a weak model's error, which a deterministic solver carries to the end. After
# all 9 epochs they read 100.0% and 99.9%, and DPM-Solver++ has the better MNIST-FID (4.8 vs 6.5),
# which is why it stays DEFAULT_SAMPLER below.
PREVIEW_SAMPLER = "ddpm"
PREVIEW_STEPS = 10

# DPM-Solver++(2M) with 20 steps matched DDIM with 50 on a CPU-recipe checkpoint (28x28)
# (500 digits at s=4: 73.0% vs 73.8% accuracy, MNIST-FID 33.1 vs 32.9) in 67 s instead of 172 s.
DEFAULT_SAMPLER = "dpm++2m"
# Chosen by `evaluate.py --guidance_sweep 2,3,4,5` on every fully trained model B recipe
# (docs/results.md): at 3 each read >= 99.3% of its digits as the digit asked for, with an
# MNIST-FID 1.9-2.3x lower than at 5 (the shipped model_b.pt: 99.4% / 2.52 against 100.0% /
# 4.83); at 2 accuracy fell to 96-99%. Models stopped early read better at higher scales
# (after 2 of 3 epochs: 97.1% at 3, 99.4% at 5): sweep your own.
DEFAULT_GUIDANCE_SCALE = 3.0
# Autoguidance of model A (autoguided_fn): chosen by `evaluate.py --guidance_sweep` (seed 0,
# docs/results.md). With min-SNR weights MNIST-FID is lowest at 3 on the 49-token network with
# its guides (bf16, guide of epoch 3: 4.89 / 3.88 / 4.21 at 2 / 3 / 4; fp32, epoch 2: 8.62 / 7.08
# at 2 / 3). With P2 weights and their draws, guided at every step: the 49-token run of
# configs/dit_cpu.args (4x4-pixel patches at width 128, 19 epochs; FID / confidence / least-most
# drawn digit) 2.01 / 0.938 / 6.3-12.0% at 2, 1.63 / 0.953 / 7.4-12.8% at
# 3, 1.82 / 0.957 / 7.3-13.2% at 4; the 49 tokens in fp32 3.61 / 0.913 at 3 against 3.20 / 0.925
# at 4 (digits 8.1-11.8% at both). With the guidance interval below: the 49-token run 1.98 /
# 0.939 / 6.5-12.1%, 1.47 / 0.954 / 7.5-12.9% and 1.51 / 0.963 / 7.9-13.2% at 2 / 3 / 4; the run of
# configs/dit_cpu.args (16 tokens) 1.85 / 0.940 / 7.8-12.1%, 1.40 / 0.958 / 7.4-12.3% and 1.41 /
# 0.962 / 7.9-12.9% (the shipped model_a.pt, those weights in bf16: 1.85 / 0.940, 1.39 / 0.957 /
# 7.3-12.2%, 1.40 / 0.962). 3 stays the default: the lowest FID of both, and on the 49-token run
# the only scale of 2, 3 and 4 with every digit within 7-13%. A run may name its own
# (train.py --guidance_scale, run_autoguidance): configs/dit_cpu_avx2.args takes 4.5 with its
# narrower guide average and the lower SNR bound below (docs/results.md, "The guide on AVX2
# kernels" and "A guidance interval for the AVX2 recipe").
DEFAULT_AUTOGUIDANCE_SCALE = 3.0
# Model A's guidance stops below this noise level (autoguided_fn): SNR(t) = ab_t / (1 - ab_t) <= 4,
# i.e. noise std >= half the signal's, t >= 145 of the default 1000-step linear schedule. The
# default 10 DPM-Solver++ steps then guide down to t = 222 and leave t = 111 and 0 to the model
# alone. Measured with `evaluate.py` (1000 samples, seed 0, scale 3; docs/results.md):
# the 49-token run of configs/dit_cpu.args (bf16) MNIST-FID 1.47 / confidence 0.954 / digits
# 7.5-12.9% against 1.63 / 0.953 / 7.4-12.8% guided at every step (the shipped model_a.pt 1.39 /
# 0.957 / 7.3-12.2% against 1.93 / 0.954 / 7.2-12.3%); the 6-block dit_cpu_avx2.args run (fp32)
# 2.04 / 0.933 / 8.7-11.6% against 2.47 / 0.933 / 8.4-11.8%. The bound 8 (only t = 0 unguided)
# reads 1.65 and 2.56, the bound 1 (guided down to t = 333) 1.65 and 2.34.
DEFAULT_AUTOGUIDANCE_MAX_SNR = 4.0
# ... and starts from this one on: 0, every step from the noisiest. A run may name its own
# (train.py --guidance_min_snr): configs/dit_cpu_avx2.args takes 0.02 (noise std about 7x the
# signal's, t <= 621), which leaves the 10 default steps t = 999, 888, 777 and 666 to the model
# alone. There the image is nearly pure noise and its class is being settled, and guidance,
# which samples roughly from p_model (p_model / p_guide)^(s - 1), would amplify the guide's own
# class bias, which differs from run to run. Measured with `evaluate.py` (fp32, 1000 samples;
# docs/results.md, "A guidance interval for the AVX2 recipe"): over five runs of that recipe x
# seeds 0-5, GAMMA 4 at scale 4.5 from 0.02 keeps every digit within 7-13% at 27 of 30, at scale
# 4 from the noisiest step at 15 (one run's ones at 14.4-16.8% on all six seeds).
# On the shipped model_a.pt at 3 the bound 0.02 gives a mean confidence of 0.956 over seeds 0-5
# against 0.959: the default stays.
DEFAULT_AUTOGUIDANCE_MIN_SNR = 0.0


def run_autoguidance(training_options):
    """(scale, min_snr): model A's autoguidance scale and the lower SNR bound of its interval
    where none are given: the ones its run chose (train.py --guidance_scale and
    --guidance_min_snr, among a checkpoint's training options "args"), else the defaults."""
    scale = training_options.get("guidance_scale")
    min_snr = training_options.get("guidance_min_snr")
    return (DEFAULT_AUTOGUIDANCE_SCALE if scale is None else scale,
            DEFAULT_AUTOGUIDANCE_MIN_SNR if min_snr is None else min_snr)


def guided_noise_fn(model, labels, guidance_scale):
    """Classifier-free guidance for model B as a model_fn(x_t, t), labels (B,):

        eps = eps(x_t, t, null) + s * (eps(x_t, t, y) - eps(x_t, t, null))

    Both predictions come from one forward pass over the doubled batch [x; x] with labels
    [y; null]. s = 1 needs only the conditional half and s = 0 only the unconditional one.
    """
    null = torch.full_like(labels, model.null_label)
    if guidance_scale == 0:
        return lambda x, t: model(x, t, null)
    if guidance_scale == 1:
        return lambda x, t: model(x, t, labels)
    both = torch.cat([labels, null])  # (2B,)

    def noise_fn(x, t):
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return noise_fn


def autoguided_fn(model, guide, guidance_scale, scheduler, max_snr=DEFAULT_AUTOGUIDANCE_MAX_SNR,
                  min_snr=DEFAULT_AUTOGUIDANCE_MIN_SNR):
    """Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself") for model A as a model_fn(x_t, t), applied in a limited interval of noise levels
    (Kynkaenniemi et al. 2024, "Applying guidance in a limited interval improves sample and
    distribution quality in diffusion models"):

        out = guide(x_t, t) + s * (model(x_t, t) - guide(x_t, t))   where min_snr <= SNR(t) <= max_snr
        out = model(x_t, t)                                          elsewhere

    with SNR(t) = ab_t / (1 - ab_t) from `scheduler`: the guidance shapes the digit while the
    image is still noisy and leaves the last, nearly clean steps to the model alone (max_snr = inf
    guides every step); min_snr > 0 also leaves it the noisiest steps, where the digit's class is
    settled (min_snr = 0 guides them). `guide` is the same network with weaker weights (model A:
    its EMA from an early epoch, training.py --guide_epoch). Where the two agree the sample
    follows both; where the trained model has moved away from the weak one, s > 1 pushes further
    in that direction, which sharpens shapes the weak model only half drew. The weights sum to one, so
    the same combination of eps or of v outputs gives the same eps. s = 1 is the model alone.
    """
    if guidance_scale == 1:
        return model
    snr = scheduler.snr  # (T,)

    def model_fn(x, t):
        guided = (snr[t] >= min_snr) & (snr[t] <= max_snr)  # (B,)
        num_guided = int(guided.sum())  # one host sync per step on CUDA
        if num_guided == 0:  # every sample on a step outside the interval: the guide is not needed
            return model(x, t)
        out = model(x, t)
        weak = guide(x, t)
        combined = weak + guidance_scale * (out - weak)
        if num_guided == len(guided):
            return combined
        return torch.where(guided.view(-1, *[1] * (out.dim() - 1)), combined, out)

    return model_fn


@torch.inference_mode()
def generate_images(model, scheduler, num_samples, labels=None, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                    sampler=DEFAULT_SAMPLER, steps=None, eta=0.0, variance=None, seed=0, device="cpu",
                    amp_dtype=None, batch_size=256, progress=False, guide=None,
                    guidance_max_snr=DEFAULT_AUTOGUIDANCE_MAX_SNR,
                    guidance_min_snr=DEFAULT_AUTOGUIDANCE_MIN_SNR):
    """num_samples images (N, C, H, W), float32 in about [-1, 1], in chunks of batch_size.

    labels: (N,) digits for model B (guided by guidance_scale), None for model A.
    guide: model A's guide network (autoguided_fn, at guidance_scale on the steps with
        guidance_min_snr <= SNR(t) <= guidance_max_snr), or None for model A alone.
    amp_dtype: the dtype to run the model in under autocast (torch.bfloat16), None for fp32.
    The same seed gives the same images.
    """
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    shape = (model.channels, model.img_size, model.img_size)
    chunks = []
    starts = range(0, num_samples, batch_size)
    # one bar over the batches when there are several, each with its own bar over the steps
    for start in tqdm(starts, desc="batches", unit="batch", disable=not progress or len(starts) == 1):
        n = min(batch_size, num_samples - start)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if labels is None:
                model_fn = (model if guide is None else
                            autoguided_fn(model, guide, guidance_scale, scheduler, guidance_max_snr,
                                          guidance_min_snr))
            else:
                model_fn = guided_noise_fn(model, labels[start:start + n].to(device), guidance_scale)
            chunks.append(sample(model_fn, scheduler, (n, *shape), sampler=sampler, steps=steps,
                                 eta=eta, variance=variance, generator=generator, device=device,
                                 progress=progress).cpu())
    return torch.cat(chunks)
