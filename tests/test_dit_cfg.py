import pytest
import torch
import torch.nn.functional as F

from dit import ModelConfigError, split_heads
from dit_cfg import ConditionalDiT, CrossAttention


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return ConditionalDiT(**{**dict(img_size=8, patch_size=2, dim=32, depth=2, heads=4), **kwargs})


def test_shapes_and_null_label():
    model = tiny_model()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999])
    y = torch.tensor([0, 9, model.null_label])  # the null label is a valid input
    assert model.null_label == 10
    assert model(x, t, y).shape == x.shape


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


def test_drop_all_drops_every_label():
    encoder = tiny_model(cond_drop_prob=0.0).cond_encoder.eval()
    assert (encoder.drop_labels(torch.arange(10), drop_all=True) == 10).all()


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


def attention_weights(layer, h, c):
    k, _ = layer.context_kv(c)
    q = split_heads(layer.q(h), layer.heads)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, H, N1, N2)


def test_cross_attention_weights_depend_on_image_tokens():
    model = tiny_model()
    c = model.cond_encoder(torch.tensor([3]))  # the model's own condition tokens, N2 = 4
    assert c.shape == (1, 4, 32)
    layer = model.blocks[0].cross_attn
    w1 = attention_weights(layer, torch.randn(1, 16, 32), c)
    w2 = attention_weights(layer, torch.randn(1, 16, 32), c)
    assert (w1 - w2).abs().max() > 1e-2  # changing h changes how it attends
    assert (w1[0, :, 0] - w1[0, :, 1]).abs().max() > 1e-3  # and tokens attend differently
    nn_init = torch.nn.init
    nn_init.normal_(layer.proj.weight)  # the branch is zero-initialised; open it to see outputs
    out1 = layer(torch.randn(1, 16, 32), c)
    assert not torch.allclose(out1[0, 0], out1[0, 1])


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.5])
def test_guidance_equals_two_separate_passes(scale):
    from sampling import guided_noise_fn
    model = tiny_model(cond_drop_prob=0.2)
    train_briefly(model, steps=5)
    model.eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([999, 500, 20, 0]), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, y, drop_all=True)
        guided = guided_noise_fn(model, y, scale)(x, t)
    assert torch.allclose(guided, uncond + scale * (cond - uncond), atol=1e-5)
