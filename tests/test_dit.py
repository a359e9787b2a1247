import math

import pytest
import torch
import torch.nn.functional as F

from dit import (DiT, Mlp, ModelConfigError, TimestepEmbedder, attention, patchify,
                 sincos_pos_embed_2d, timestep_sinusoid, unpatchify)
from dit_cfg import ConditionalDiT
from tests.conftest import perturbed


@pytest.mark.parametrize("img_size,patch_size,channels", [(8, 2, 1), (16, 4, 1), (12, 3, 3), (8, 8, 2)])
def test_output_shape_and_values(img_size, patch_size, channels):
    """Shape, and with weights off their zero init: each sample's output is that sample's alone
    (nothing mixes across the batch) and depends on its image and its timestep."""
    torch.manual_seed(0)
    model = perturbed(DiT(img_size=img_size, channels=channels, patch_size=patch_size, dim=32, depth=2, heads=4))
    x, t = torch.randn(3, channels, img_size, img_size), torch.tensor([0, 5, 999])
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == x.shape and out.dtype == torch.float32 and out.isfinite().all()
        for i in range(3):
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1]), out[i:i + 1], rtol=1e-5, atol=1e-6)
        assert (model(x, t.flip(0)) - out)[[0, 2]].abs().amax(dim=(1, 2, 3)).gt(1e-3).all()  # t changes it
        assert (model(x.flip(0), t) - out)[[0, 2]].abs().amax(dim=(1, 2, 3)).gt(1e-3).all()  # x changes it


def ref_sincos_table(dim, grid_size):
    """(grid_size**2, dim), written from the definition with python floats: token n = row * G + col
    gets [sin(row w_k)]_k, [cos(row w_k)]_k, [sin(col w_k)]_k, [cos(col w_k)]_k, w_k = 10000^(-k / (dim/4))."""
    freqs = [10000 ** (-k / (dim // 4)) for k in range(dim // 4)]
    rows = []
    for row in range(grid_size):
        for col in range(grid_size):
            rows.append([f(pos * w) for pos in (row, col) for f in (math.sin, math.cos) for w in freqs])
    return torch.tensor(rows, dtype=torch.float64)


def test_embed_adds_the_2d_sincos_positions():
    """embed() = linear patch embedding + the position table, computed here independently: patches
    by F.unfold (row-major, one channel), the linear from its weights, the table from its formula."""
    torch.manual_seed(0)
    model = DiT(img_size=8, patch_size=2, dim=16, depth=1, heads=2)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        tokens, _ = model.embed(x, t)
    patches = F.unfold(x.double(), kernel_size=2, stride=2).transpose(1, 2)  # (2, 16, 4)
    linear = patches @ model.patch_embed.weight.double().T + model.patch_embed.bias.double()
    torch.testing.assert_close(tokens.double(), linear + ref_sincos_table(16, 4), rtol=0, atol=1e-5)


def test_output_is_not_equivariant_to_permuting_patches():
    """Self-attention, the MLP and adaLN treat tokens as a set: without positions, moving the
    input's patches would move the output's patches the same way. The 2D positions break that,
    so the model can tell where a patch is; zeroing them restores it (the test's premise)."""
    torch.manual_seed(0)
    model = perturbed(DiT(img_size=8, patch_size=2, dim=32, depth=2, heads=4))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 600])
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))

    def permuted(images):  # move the 16 patches of (B, 1, 8, 8) images by perm
        return unpatchify(patchify(images, 2)[:, perm], 2, 1, 8, 8)

    with torch.no_grad():
        gap = (model(permuted(x), t) - permuted(model(x, t))).abs().max()
        model.pos_embed.zero_()
        torch.testing.assert_close(model(permuted(x), t), permuted(model(x, t)), rtol=1e-5, atol=1e-5)
    assert gap > 1e-2, gap


def test_zero_output_at_initialisation():
    model = DiT(img_size=8, patch_size=2, dim=32, depth=2, heads=4)
    out = model(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)))
    assert torch.count_nonzero(out) == 0


def test_gradients_reach_every_parameter_after_one_step():
    torch.manual_seed(0)
    model = DiT(img_size=8, patch_size=2, dim=32, depth=2, heads=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, target = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.randn(4, 1, 8, 8)
    # zero-initialised layers pass no gradient upstream until they have been updated once:
    # step 1 moves the output layer, step 2 the adaLN modulations, step 3 reaches t_embedder
    for _ in range(3):
        optimizer.zero_grad()
        F.mse_loss(model(x, t), target).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_patchify_matches_unfold_and_round_trips():
    x = torch.randn(2, 3, 12, 8)
    tokens = patchify(x, 4)  # (2, 6, 48)
    # independent reference: F.unfold gives (B, C*p*p, N) with channel-major patch vectors
    ref = F.unfold(x, kernel_size=4, stride=4).transpose(1, 2).reshape(2, 6, 3, 16)
    assert torch.equal(tokens.reshape(2, 6, 16, 3).permute(0, 1, 3, 2), ref)
    assert torch.equal(unpatchify(tokens, 4, 3, 12, 8), x)


def test_sincos_pos_embed_closed_form():
    emb = sincos_pos_embed_2d(8, 3)  # dim/4 = 2 frequencies: 1 and 1/100
    assert emb.shape == (9, 8)
    row, col = 2, 1  # token index 2*3 + 1 = 7
    expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
                math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    assert torch.allclose(emb[7], torch.tensor(expected), atol=1e-6)


def test_timestep_embedding_is_float32_under_bf16_autocast():
    """The embedder switches autocast off, so under bf16 autocast it computes exactly what it
    computes in fp32. Were its linears run in bf16 (8-bit mantissa), the sinusoid features of
    neighbouring timesteps, which differ by about w_k << 2^-8 at low frequencies, would round
    together."""
    torch.manual_seed(0)
    embedder = TimestepEmbedder(32)
    t = torch.arange(990, 1000)  # neighbouring steps, where bf16 rounding would merge features
    reference = embedder(t)  # autocast off: fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = embedder(t)
        linear_out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert linear_out.dtype == torch.bfloat16  # autocast is really on
    assert out.dtype == torch.float32
    # bit for bit: nothing ran in bf16 (with the autocast block removed from
    # TimestepEmbedder.forward this fails, also when the output is cast back to fp32)
    assert torch.equal(out, reference)
    # the sinusoid itself: cos(t * 10000^(-k/half)) then sin(...)
    sinusoid = timestep_sinusoid(torch.tensor([7]), 4)
    assert torch.allclose(sinusoid, torch.tensor([[math.cos(7), math.cos(7 / 100),
                                                   math.sin(7), math.sin(7 / 100)]]), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n1,n2", [(16, 16), (64, 3), (300, 300)])
def test_attention_matches_reference(dtype, n1, n2):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, n1, 8), torch.randn(2, 4, n2, 8), torch.randn(2, 4, n2, 8)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8), -1) @ v.double()
    out = attention(q.to(dtype), k.to(dtype), v.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("kwargs,message", [
    (dict(img_size=30, patch_size=4), "divisible by patch_size"),
    (dict(dim=30, heads=4), "divisible by heads"),
    (dict(dim=6, heads=2), "divisible by 4"),
    (dict(depth=0), "depth"),
    (dict(patch_size=0), "patch_size"),
    (dict(gelu_approximate="erf"), "gelu_approximate must be one of"),
])
def test_impossible_shapes_raise_clear_errors(kwargs, message):
    with pytest.raises(ModelConfigError, match=message):
        DiT(**{**dict(img_size=8, patch_size=2, dim=32, depth=1, heads=4), **kwargs})


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_mlp_gelu_is_its_closed_form(approximate):
    """The MLP's activation in float64 against the two closed forms written here: "tanh" is
    0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))), "none" the exact h Phi(h) = 0.5 h (1 + erf(h / sqrt 2));
    each output matches its own form and not the other's (they differ by up to ~5e-4)."""
    torch.manual_seed(0)
    mlp = Mlp(8, 32, approximate).double()
    x = 2 * torch.randn(3, 5, 8, dtype=torch.float64)
    h = mlp.fc1(x)
    exact = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    tanh_form = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    own, other = (exact, tanh_form) if approximate == "none" else (tanh_form, exact)
    with torch.no_grad():
        out = mlp(x)
        torch.testing.assert_close(out, mlp.fc2(own), rtol=0, atol=1e-12)
        assert (out - mlp.fc2(other)).abs().max() > 1e-6


@pytest.mark.parametrize("model_class", [DiT, ConditionalDiT])
def test_gelu_approximate_reaches_every_block_and_the_config(model_class):
    """Every block's MLP uses the model's GELU, the config keeps it (checkpoints rebuild from it),
    and the default is DiT's tanh approximation."""
    shape = dict(img_size=8, patch_size=2, dim=32, depth=3, heads=4)
    assert all(block.mlp.gelu_approximate == "tanh" for block in model_class(**shape).blocks)
    model = model_class(**shape, gelu_approximate="none")
    assert [block.mlp.gelu_approximate for block in model.blocks] == ["none"] * 3
    assert model_class(**model.config).config["gelu_approximate"] == "none"


def test_wrong_input_shape_raises():
    model = DiT(img_size=8, patch_size=2, dim=32, depth=1, heads=4)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="t of shape"):
        model(torch.randn(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))
