import math

import pytest
import torch
import torch.nn.functional as F

from dit import DiT, ModelConfigError
from dit_cfg import ConditionalDiT, CrossAttention
from sampling import generate_images, guided_noise_fn, sample
from scheduler import NoiseScheduler
from tests.conftest import perturbed


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return ConditionalDiT(**{**dict(img_size=8, patch_size=2, dim=32, depth=2, heads=4), **kwargs})


def test_shapes_and_null_label():
    """The null label is a valid input and, once the weights are off their zero init, gives its own
    prediction: the same x and t with labels 0, 9 and null give three different outputs, each the
    one its sample gets alone."""
    model = perturbed(tiny_model())
    assert model.null_label == 10 and model.num_classes == 10 and DiT.num_classes == 0
    x, t = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1), torch.full((3,), 300)
    y = torch.tensor([0, 9, model.null_label])
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == x.shape and out.isfinite().all()
        for i, j in ((0, 2), (1, 2), (0, 1)):
            assert (out[i] - out[j]).abs().max() > 1e-3, (i, j)
        for i in range(3):
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], y[i:i + 1]), out[i:i + 1], rtol=1e-5, atol=1e-6)


def test_null_label_is_num_classes():
    assert tiny_model(num_classes=7).null_label == 7
    assert tiny_model(num_classes=7).cond_encoder.table.num_embeddings == 8


def test_single_condition_token_is_refused():
    with pytest.raises(ModelConfigError, match="cond_tokens"):
        tiny_model(cond_tokens=1)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_condition_dropout_rate(p):
    encoder = tiny_model(cond_drop_prob=p).cond_encoder.train()
    y = torch.randint(0, 10, (40000,))
    dropped = encoder.drop_labels(y)
    share = (dropped == 10).float().mean().item()
    assert abs(share - p) < 0.015
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])  # the others are untouched


def test_no_dropout_at_zero_or_in_eval_mode():
    y = torch.randint(0, 10, (5000,))
    assert torch.equal(tiny_model(cond_drop_prob=0.0).cond_encoder.train().drop_labels(y), y)
    assert torch.equal(tiny_model(cond_drop_prob=0.9).cond_encoder.eval().drop_labels(y), y)


def test_eval_mode_is_deterministic():
    model = tiny_model(cond_drop_prob=0.5)
    train_briefly(model, steps=3)
    model.eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.full((4,), 500), torch.arange(4)
    assert torch.equal(model(x, t, y), model(x, t, y))


def train_briefly(model, steps):
    """A few denoising steps on data whose image depends on the label."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        y = torch.randint(0, 10, (32,))
        x0 = (y.float().view(-1, 1, 1, 1) / 4.5 - 1).expand(-1, 1, 8, 8)
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (32,))
        x_t = 0.7 * x0 + 0.7 * noise
        loss = F.mse_loss(model(x_t, t, y), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_label_reaches_the_output():
    model = tiny_model(cond_drop_prob=0.2)
    train_briefly(model, steps=20)
    model.eval()
    x, t = torch.randn(1, 1, 8, 8).expand(11, -1, -1, -1), torch.full((11,), 300)
    out = model(x, t, torch.arange(11))  # labels 0-9 and the null label, same x and t
    for i in range(11):
        for j in range(i + 1, 11):
            assert (out[i] - out[j]).abs().max() > 1e-4, (i, j)


@pytest.mark.parametrize("n2", [1, 3, 8])
def test_cross_attention_shapes(n2):
    layer = CrossAttention(32, 4)
    h, c = torch.randn(2, 5, 32), torch.randn(2, n2, 32)
    assert layer(h, c).shape == (2, 5, 32)


def test_cross_attention_single_token_closed_form():
    """Softmax over one key is 1: every query receives proj(W_v c + b_v), whatever h is."""
    torch.manual_seed(0)
    layer = CrossAttention(32, 4)
    h, c = torch.randn(2, 5, 32), torch.randn(2, 1, 32)
    value = c @ layer.kv.weight[32:].T + layer.kv.bias[32:]  # (2, 1, 32)
    expected = (value @ layer.proj.weight.T + layer.proj.bias).expand(2, 5, 32)
    assert torch.allclose(layer(h, c), expected, atol=1e-5)
    assert torch.allclose(layer(torch.randn(2, 5, 32), c), expected, atol=1e-5)


def reference_cross_attention(layer, h, c):
    """softmax(Q K^T / sqrt(d)) V per head, then the output projection, in float64 from the
    layer's weights; heads are written out as channel blocks here, not via split_heads/attention.
    h (B, N1, dim), c (B, N2, dim) -> (B, N1, dim)."""
    dim, heads = layer.q.weight.shape[0], layer.heads
    d = dim // heads
    w_kv, b_kv = layer.kv.weight.double(), layer.kv.bias.double()
    q = h.double() @ layer.q.weight.double().T + layer.q.bias.double()  # (B, N1, dim)
    k = c.double() @ w_kv[:dim].T + b_kv[:dim]  # (B, N2, dim): the first half of kv is K
    v = c.double() @ w_kv[dim:].T + b_kv[dim:]
    out = torch.empty(h.shape, dtype=torch.float64)
    for head in range(heads):
        block = slice(head * d, (head + 1) * d)
        scores = q[..., block] @ k[..., block].transpose(1, 2) / math.sqrt(d)  # (B, N1, N2)
        out[..., block] = torch.softmax(scores, dim=-1) @ v[..., block]
    return out @ layer.proj.weight.double().T + layer.proj.bias.double()


def open_cross_attention(model):
    """Block 0's cross-attention with its zero-initialised output projection given weights."""
    layer = model.blocks[0].cross_attn
    with torch.no_grad():
        torch.nn.init.normal_(layer.proj.weight, std=0.2)
        torch.nn.init.normal_(layer.proj.bias, std=0.2)
    return layer


@pytest.mark.parametrize("n1", [1, 16])
def test_cross_attention_forward_matches_softmax_qk_v(n1):
    model = tiny_model()
    layer = open_cross_attention(model)
    c = model.cond_encoder(torch.tensor([3, 7])).detach()  # the model's own condition tokens
    assert c.shape == (2, 4, 32)
    h = torch.randn(2, n1, 32)
    with torch.no_grad():
        out = layer(h, c)
        expected = reference_cross_attention(layer, h, c)
        assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)
        # under CPU bf16 autocast attention() takes its plain softmax path: same numbers to bf16 precision
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(h, c)
        assert low.dtype == torch.bfloat16
        assert torch.allclose(low.double(), expected, rtol=3e-2, atol=3e-2)


def test_cross_attention_output_depends_on_image_tokens_through_the_weights():
    """K and V come from the condition tokens alone, so h reaches forward()'s output only
    through the attention weights softmax(Q K^T / sqrt(d)), Q = W_q h + b_q: different image
    tokens, or a new h, give different outputs only if they attend differently. The weights
    are a convex combination: with every value equal to u, each query receives proj(u)."""
    model = tiny_model()
    layer = open_cross_attention(model)
    c = model.cond_encoder(torch.tensor([3])).detach()  # N2 = 4 condition tokens
    h1, h2 = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    with torch.no_grad():
        out1, out2 = layer(h1, c), layer(h2, c)
        assert (out1 - out2).abs().max() > 1e-2  # changing h changes how it attends
        assert (out1[0, 0] - out1[0, 1]).abs().max() > 1e-2  # and tokens attend differently
        u = torch.randn(32)
        layer.kv.weight[32:] = 0  # V = u for every condition token
        layer.kv.bias[32:] = u
        expected = (layer.proj.weight @ u + layer.proj.bias).expand(1, 16, 32)
        assert torch.allclose(layer(h1, c), expected, atol=1e-5)
        assert torch.allclose(layer(h2, c), expected, atol=1e-5)


class Recorder:
    """Wraps model B and records the (batch size, labels) of each forward."""

    def __init__(self, model):
        self.model, self.null_label, self.calls = model, model.null_label, []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.tolist()))
        return self.model(x, t, y)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5])
def test_guidance_equals_two_separate_passes(scale):
    """eps_null + s (eps_y - eps_null), from one forward over [x; x] with labels [y; null], or for
    s = 0 and s = 1 from the one half that counts."""
    model = tiny_model(cond_drop_prob=0.2)
    train_briefly(model, steps=5)
    model.eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([999, 500, 20, 0]), torch.tensor([1, 2, 3, 4])
    null = torch.full((4,), model.null_label)
    recorder = Recorder(model)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        guided = guided_noise_fn(recorder, y, scale)(x, t)
    assert torch.allclose(guided, uncond + scale * (cond - uncond), atol=1e-5)
    expected_calls = {0.0: [(4, null.tolist())], 1.0: [(4, y.tolist())], 3.5: [(8, y.tolist() + null.tolist())]}
    assert recorder.calls == expected_calls[scale]


def test_guidance_scale_1_is_plain_conditional_sampling():
    """generate_images at s = 1 draws what sample() draws from the conditional model alone with
    the same seed, and at s = 0 what it draws from the null label; the two differ."""
    model = perturbed(tiny_model())
    scheduler = NoiseScheduler(timesteps=50)
    y = torch.tensor([3, 1, 4, 1, 5])
    null = torch.full_like(y, model.null_label)

    def plain(labels):
        return sample(lambda x, t: model(x, t, labels), scheduler, (5, 1, 8, 8), sampler="ddpm", steps=10,
                      generator=torch.Generator().manual_seed(7))

    def guided(scale):
        return generate_images(model, scheduler, 5, labels=y, guidance_scale=scale, sampler="ddpm", steps=10, seed=7)

    conditional = guided(1.0)
    assert torch.equal(conditional, plain(y))
    assert torch.equal(guided(0.0), plain(null))
    assert (conditional - plain(null)).abs().max() > 1e-2
