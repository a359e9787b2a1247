"""EMA and the power-function average, the learning-rate schedule, the optimizer and growth by
stacking, against closed forms."""
import copy
from types import SimpleNamespace

import pytest
import torch

from dit import DiT
from ema import EMA, PowerEMA
from training import grow_by_stacking, learning_rate, make_optimizer


def test_ema_starts_as_a_copy_and_follows_the_closed_form():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ema.state_dict()[name], tensor)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # n = 1: d = min(0.9, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * before + (1 - d) * model.weight)
    assert ema.module.weight.data_ptr() != model.weight.data_ptr()  # a copy, not an alias
    for _ in range(200):
        ema.update(model)  # warm-up over: d = 0.9, the EMA converges to the weights
    assert torch.allclose(ema.module.weight, model.weight, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_power_ema_weighs_each_step_as_its_closed_form(gamma):
    """After n updates with weights theta_1..theta_n the average is
    sum_k [(k/n)^(gamma+1) - ((k-1)/n)^(gamma+1)] theta_k, computed here in float64 from the
    list of weights; gamma 0 is the plain mean. The module starts as a copy, as EMA's does."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    average = PowerEMA(model, gamma)
    assert torch.equal(average.module.weight, model.weight)
    seen = []
    for _ in range(12):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        seen.append(model.weight.detach().double().clone())
        average.update(model)
    n = len(seen)
    expected = sum(((k / n) ** (gamma + 1) - ((k - 1) / n) ** (gamma + 1)) * w for k, w in enumerate(seen, 1))
    assert torch.allclose(average.module.weight.double(), expected, atol=1e-5)
    if gamma == 0:
        assert torch.allclose(average.module.weight.double(), torch.stack(seen).mean(0), atol=1e-5)
    assert not torch.allclose(expected, seen[-1], atol=1e-2)  # an average, not the last weights


def test_learning_rate_warmup_then_step_decay_by_epochs():
    """lr = peak * min(1, (step + 1) / warmup) * rate ** (epoch // decay_step), whatever the
    number of steps per epoch (a resumed run may take other batches)."""
    args = SimpleNamespace(lr=1e-3, warmup_steps=10, lr_decay_step=2, lr_decay_rate=0.5)
    assert learning_rate(args, 0, epoch=0) == 1e-4                  # (0 + 1) / 10 of the peak
    assert learning_rate(args, 9, epoch=0) == 1e-3
    assert learning_rate(args, 10_000, epoch=1) == 1e-3             # still epochs 1-2
    assert learning_rate(args, 200, epoch=2) == 5e-4                # epoch 3: one decay
    assert learning_rate(args, 3, epoch=5) == pytest.approx(1e-4)  # 4/10 warm-up, two decays
    args.lr_decay_step = None
    assert learning_rate(args, 10_000, epoch=50) == 1e-3


@pytest.mark.parametrize("beta2_option,b2", [({}, 0.999), ({"beta2": 0.9}, 0.9)], ids=["default", "beta2_0.9"])
def test_optimizer_is_adamw_without_weight_decay_by_its_closed_form(beta2_option, b2):
    """Two steps of the (fused) optimizer against Adam's update written out:
    m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, w -= lr (m / (1-b1^k)) / (sqrt(v / (1-b2^k)) + eps),
    with b1 = 0.9 and b2 = 0.999 (the default) or the beta2 given."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer(model, lr=0.1, device="cpu", **beta2_option)
    w = model.weight.detach().clone().double()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    b1, eps = 0.9, 1e-8
    for k in (1, 2):
        optimizer.zero_grad()
        (model(torch.randn(5, 4)) ** 2).sum().backward()
        g = model.weight.grad.double()
        optimizer.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - 0.1 * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)  # no decay term
        assert torch.allclose(model.weight.double(), w, atol=1e-6)


def tracked_runs(amp_dtype, grad_scaler_for=None):
    """60 steps of a tiny model B on bar digits in fp32 and under `amp_dtype` (same start,
    timesteps and noise); returns the two loss curves (60,)."""
    from dit_cfg import ConditionalDiT
    from scheduler import NoiseScheduler
    from training import training_step

    gen = torch.Generator().manual_seed(0)
    x0 = torch.zeros(32, 1, 8, 8)
    labels = torch.arange(32) % 10
    for i, label in enumerate(labels):  # a bar whose row says the digit, as in tests' tiny MNIST
        x0[i, 0, label % 8, 1:7] = 1.0
    x0 = x0 * 2 - 1
    steps = 60
    ts = torch.randint(0, 1000, (steps, 32), generator=gen)
    noises = torch.randn(steps, *x0.shape, generator=gen)
    scheduler = NoiseScheduler()

    def run(dtype):
        torch.manual_seed(0)
        model = ConditionalDiT(img_size=8, patch_size=2, dim=32, depth=2, heads=2, cond_tokens=2,
                               cond_drop_prob=0.0)
        optimizer = make_optimizer(model, 2e-3, "cpu")
        scaler = grad_scaler_for() if dtype is not None and grad_scaler_for else None
        return torch.stack([training_step(model, scheduler, optimizer, x0, labels, amp_dtype=dtype,
                                          grad_scaler=scaler, grad_clip=1.0, t=ts[k], noise=noises[k])
                            for k in range(steps)])

    return run(None), run(amp_dtype)


def test_bf16_autocast_training_tracks_fp32():
    """bf16 autocast with fp32 master weights (the default on CUDA and AMX CPUs) follows the
    fp32 run step for step: both learn, and the losses differ by 1.4% on average (measured).
    On the CPU bf16 also switches attention to the plain softmax(QK^T)V path, so this compares
    that path against fused SDPA in training: with its 1/sqrt(d) scale left out the gap grew
    to 4.2%, which fails here; so would a run that silently ignored bf16 (identical losses)."""
    fp32, bf16 = tracked_runs(torch.bfloat16)
    assert not torch.equal(fp32, bf16)  # bf16 was used
    assert fp32[-10:].mean() < 0.6 * fp32[:10].mean()  # it learns
    assert bf16[-10:].mean() < 0.6 * bf16[:10].mean()
    relative = ((bf16 - fp32).abs() / fp32).mean()
    assert relative < 0.025, relative.item()


def test_fp16_training_with_a_grad_scaler_tracks_fp32():
    """--precision fp16: autocast to float16 with a GradScaler, which multiplies the loss by
    S = 2^16 before backward and divides the gradients by S before clipping and the step. Had
    the gradients not been unscaled, clipping would see them S times too large and the steps
    would shrink, so the losses would leave the fp32 curve; had fp16 been ignored, the curves
    would be identical."""
    scalers = []

    def make_scaler():
        scalers.append(torch.amp.GradScaler("cpu"))
        return scalers[-1]

    fp32, fp16 = tracked_runs(torch.float16, make_scaler)
    assert scalers and scalers[0].get_scale() >= 2.0 ** 10  # the scale stayed large: no runaway overflow
    assert not torch.equal(fp32, fp16)
    assert fp16[-10:].mean() < 0.6 * fp16[:10].mean()
    relative = ((fp16 - fp32).abs() / fp32).mean()
    assert relative < 0.025, relative.item()


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                 ((7, 0), "fp16"), ((6, 1), "fp32")])
def test_default_precision_on_cuda_follows_the_compute_capability(capability, expected, monkeypatch):
    """bf16 only from Ampere (8.0) on: older GPUs report bf16 as supported but emulate it."""
    from options import default_precision
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as a T4 says
    assert default_precision(torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("cpuinfo,expected", [("flags : avx2 amx_bf16 amx_tile", "bf16"),
                                              ("flags : avx2 avx512f avx512_bf16", "bf16"),
                                              ("flags : avx2 fma", "fp32")])
def test_default_precision_on_cpu_follows_its_bf16_hardware(cpuinfo, expected, monkeypatch, tmp_path):
    import builtins
    import options
    real_open = builtins.open
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
        tmp_path / "cpuinfo" if path == "/proc/cpuinfo" else path, *a, **k))
    assert options.default_precision(torch.device("cpu")) == expected


class FixedOutput(torch.nn.Module):
    """A 'model' whose output is one learnable tensor, whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out.clone())

    def forward(self, x, t):
        return self.out


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting,gamma", [("min_snr", None), ("min_snr", 0.0), ("min_snr", 5.0), ("p2", None)])
def test_training_loss_is_the_x0_error_weighted_by_its_closed_form(prediction, weighting, gamma):
    """Written as an error on the clean image, the eps loss weighs each timestep by SNR_t, the
    v loss by SNR_t + 1 (Salimans & Ho), min-SNR-gamma by min(SNR_t, gamma) whatever the
    target (Hang et al. 2023), and P2 by SNR_t / (1 + SNR_t) (Choi et al. 2022, k = gamma = 1);
    gamma 0 (--min_snr_gamma 0) or None is no weighting. The x0 the
    model implies is computed here in float64 from the definitions: x0_hat = (x_t - s eps_hat) / a
    for eps, a x_t - s v_hat for v."""
    from scheduler import NoiseScheduler
    from tests.conftest import ref_alphas_cumprod
    from training import training_step

    ab = torch.from_numpy(ref_alphas_cumprod("linear")[1])
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 3, 40, 200, 500, 999])
    x0 = torch.rand(6, 1, 4, 4, generator=gen) * 2 - 1
    noise, out = torch.randn(6, 1, 4, 4, generator=gen), torch.randn(6, 1, 4, 4, generator=gen)
    model = FixedOutput(out)
    loss = training_step(model, NoiseScheduler(prediction=prediction), make_optimizer(model, 1e-3, "cpu"),
                         x0, loss_weighting=weighting, min_snr_gamma=gamma, t=t, noise=noise)

    a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0.double() + s * noise.double()
    x0_hat = (x_t - s * out.double()) / a if prediction == "eps" else a * x_t - s * out.double()
    snr = ab[t] / (1 - ab[t])
    if weighting == "p2":
        weight = snr / (1 + snr)
    elif gamma:
        weight = snr.clamp(max=gamma)
    else:
        weight = snr if prediction == "eps" else snr + 1
    expected = (weight * (x0.double() - x0_hat).pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
def test_importance_sampled_loss_weighs_every_image_by_the_mean_weight(prediction, weighting):
    """--importance_sampling: t is drawn with P(t) = w(t) / sum w and each image's error weighs
    mean_s w(s), so that E_P[mean(w) L_t] = (1/T) sum_t w(t) L_t, the uniformly drawn weighted
    loss. For given t the loss is mean(w) times the plain squared error of the target, with the
    x0 weight min(SNR, 5) or SNR / (1 + SNR) (P2) divided by SNR (eps) or SNR + 1 (v), from the
    float64 schedule."""
    from scheduler import NoiseScheduler
    from tests.conftest import ref_alphas_cumprod
    from training import training_step

    ab = torch.from_numpy(ref_alphas_cumprod("linear")[1])
    snr = ab / (1 - ab)
    x0_weight = snr.clamp(max=5) if weighting == "min_snr" else snr / (1 + snr)
    mean_weight = (x0_weight / (snr if prediction == "eps" else snr + 1)).mean()
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 40, 500, 999])
    x0 = torch.rand(4, 1, 4, 4, generator=gen) * 2 - 1
    noise, out = torch.randn(4, 1, 4, 4, generator=gen), torch.randn(4, 1, 4, 4, generator=gen)
    model = FixedOutput(out)
    loss = training_step(model, NoiseScheduler(prediction=prediction), make_optimizer(model, 1e-3, "cpu"),
                         x0, loss_weighting=weighting, min_snr_gamma=5.0, importance_sampling=True,
                         t=t, noise=noise)

    a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    target = noise.double() if prediction == "eps" else a * noise.double() - s * x0.double()
    expected = mean_weight * (out.double() - target).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("gamma", [None, 0.0])
def test_importance_sampling_needs_loss_weights(gamma):
    from scheduler import NoiseScheduler
    from training import training_step

    model = FixedOutput(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        training_step(model, NoiseScheduler(), make_optimizer(model, 1e-3, "cpu"), torch.zeros(2, 1, 4, 4),
                      min_snr_gamma=gamma, importance_sampling=True)


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_unknown_loss_weighting_is_refused(gamma):
    from scheduler import NoiseScheduler
    from training import training_step

    model = FixedOutput(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="unknown loss_weighting 'snr'"):
        training_step(model, NoiseScheduler(), make_optimizer(model, 1e-3, "cpu"), torch.zeros(2, 1, 4, 4),
                      loss_weighting="snr", min_snr_gamma=gamma)


def test_growing_stacks_blocks_averages_and_adam_moments_and_adam_goes_on_with_them():
    """A 2-block DiT after two AdamW steps, grown to 4 blocks: the deep network computes what
    the shallow one computes with its blocks run as [0, 1, 0, 1]; each deep parameter, its EMA
    weight, its power-average weight (kind, gamma and count kept) and its AdamW moments and
    step count equal those of its source (block i % 2), in
    tensors of their own; and the next AdamW step of a copied block follows Adam's closed
    form from the copied moments (a cold start would differ). Growing draws nothing from the
    global random stream."""
    torch.manual_seed(0)
    shallow = DiT(img_size=8, patch_size=4, dim=16, depth=2, heads=2)
    with torch.no_grad():  # not the zero-initialised layers of DiT, whose blocks start as the identity
        for param in shallow.parameters():
            param.normal_(0, 0.2)
    optimizer = make_optimizer(shallow, lr=0.01, device="cpu", beta2=0.99)
    ema, guide_average = EMA(shallow, decay=0.9), PowerEMA(shallow, gamma=2.0)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 400, 999])
    for _ in range(2):
        optimizer.zero_grad()
        ((shallow(x, t) - x) ** 2).mean().backward()
        optimizer.step()
        ema.update(shallow)
        guide_average.update(shallow)
    before = copy.deepcopy(shallow)
    source_state = {name: copy.deepcopy(optimizer.state[p]) for name, p in shallow.named_parameters()}

    rng = torch.get_rng_state()
    deep, deep_ema, deep_optimizer, deep_average = grow_by_stacking(shallow, ema, optimizer, "cpu", guide_average)
    assert torch.equal(torch.get_rng_state(), rng)  # training's noise stream goes on undisturbed
    assert deep.config == dict(shallow.config, depth=4) and deep_ema.num_updates == deep_average.num_updates == 2
    assert type(deep_ema) is EMA and deep_ema.decay == 0.9
    assert type(deep_average) is PowerEMA and deep_average.gamma == 2.0
    assert grow_by_stacking(shallow, ema, optimizer, "cpu")[3] is None  # no power average kept: none grown
    twice = copy.deepcopy(before)
    twice.blocks = torch.nn.ModuleList([twice.blocks[0], twice.blocks[1], twice.blocks[0], twice.blocks[1]])
    with torch.no_grad():
        assert torch.allclose(deep(x, t), twice(x, t), atol=1e-6)
        assert not torch.allclose(deep(x, t), before(x, t), atol=1e-4)  # a deeper function, not the same one

    def source(name):
        parts = name.split(".")
        return ".".join(["blocks", str(int(parts[1]) % 2), *parts[2:]]) if parts[0] == "blocks" else name

    shallow_params, ema_params = dict(before.named_parameters()), dict(ema.module.named_parameters())
    average_params = dict(guide_average.module.named_parameters())
    assert not torch.equal(average_params["blocks.0.mlp.fc1.weight"], ema_params["blocks.0.mlp.fc1.weight"])
    deep_params = dict(deep.named_parameters())
    assert len(deep_params) == len(shallow_params) + len([n for n in shallow_params if n.startswith("blocks.")])
    for name, param in deep_params.items():
        assert torch.equal(param, shallow_params[source(name)])
        assert torch.equal(deep_ema.module.state_dict()[name], ema_params[source(name)])
        assert torch.equal(deep_average.module.state_dict()[name], average_params[source(name)])
        state = deep_optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], source_state[source(name)][key]), (name, key)
    assert (deep_optimizer.state[deep_params["blocks.0.mlp.fc1.weight"]]["exp_avg"].data_ptr()
            != deep_optimizer.state[deep_params["blocks.2.mlp.fc1.weight"]]["exp_avg"].data_ptr())
    group = deep_optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0

    # one more step: w -= lr m_hat / (sqrt(v_hat) + eps), k = 3, from the stacked moments
    name = "blocks.2.mlp.fc1.weight"
    param = deep_params[name]
    w, m, v = (param.detach().double().clone(), source_state[source(name)]["exp_avg"].double(),
               source_state[source(name)]["exp_avg_sq"].double())
    deep_optimizer.zero_grad()
    ((deep(x, t) - x) ** 2).mean().backward()
    g = param.grad.double()
    deep_optimizer.step()
    m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
    expected = w - 0.01 * (m / (1 - 0.9 ** 3)) / ((v / (1 - 0.99 ** 3)).sqrt() + 1e-8)
    assert torch.allclose(param.detach().double(), expected, atol=1e-6)
