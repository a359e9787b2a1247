"""Model A: an unconditional Diffusion Transformer (Peebles & Xie, 2023) that predicts noise.

    x (B, C, H, W) --patchify--> (B, N, p*p*C) --linear--> tokens (B, N, dim) + 2D sin-cos positions
    t (B,) --sinusoid--> MLP --> t_emb (B, dim)   (conditions every block through adaLN-Zero)
    depth x DiTBlock(tokens, t_emb) --> FinalLayer --> (B, N, p*p*C) --unpatchify--> eps_hat (B, C, H, W)

with N = (H / p) * (W / p) tokens. The pieces are small classes that dit_cfg.py (model B)
imports and reuses; all initialisation lives in `DiT.initialize_weights`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# Attention: the one function every attention layer calls.

# On the CPU under bf16, the backward pass of the fused scaled_dot_product_attention is
# several times slower than a plain softmax(QK^T / sqrt(d)) V at short sequences, while
# the fused kernel wins at long ones (docs/performance.md). Up to this many
# query*key pairs per head the plain path is used on the CPU in bf16.
CPU_BF16_MATH_ATTENTION_MAX_PAIRS = 256 * 256


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v.  q: (B, heads, N1, d), k and v: (B, heads, N2, d)."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16
            and q.shape[-2] * k.shape[-2] <= CPU_BF16_MATH_ATTENTION_MAX_PAIRS):
        weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N1, N2)
        return weights.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


def split_heads(x, heads):
    """(B, N, heads * d) -> (B, heads, N, d)."""
    B, N, _ = x.shape
    return x.view(B, N, heads, -1).transpose(1, 2)


def merge_heads(x):
    """(B, heads, N, d) -> (B, N, heads * d)."""
    B, H, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, H * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, N, dim)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, N, dim)
        out = attention(split_heads(q, self.heads), split_heads(k, self.heads),
                        split_heads(v, self.heads))
        return self.proj(merge_heads(out))  # (B, N, dim)


# The MLP's GELU, as F.gelu's `approximate` names it: "tanh" (the default, as in DiT, and what a
# checkpoint whose config lacks the key was trained with) is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
# "none" is the exact x Phi(x) = 0.5 x (1 + erf(x / sqrt(2))). They differ by at most 5e-4, and
# the exact one is the cheaper on a CPU (docs/results.md, "The exact GELU").
GELU_APPROXIMATIONS = ("tanh", "none")


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, gelu_approximate="tanh"):
        super().__init__()
        self.gelu_approximate = gelu_approximate
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):  # (B, N, dim) -> (B, N, hidden_dim) -> (B, N, dim)
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu_approximate))


# ----------------------------------------------------------------------------------------
# Embeddings

def patchify(x, patch_size):
    """(B, C, H, W) -> (B, N, p*p*C) with N = (H/p)(W/p), patches in row-major order."""
    B, C, H, W = x.shape
    p = patch_size
    x = x.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens, patch_size, channels, height, width):
    """(B, N, p*p*C) -> (B, C, H, W); the inverse of `patchify`."""
    B = tokens.shape[0]
    p = patch_size
    x = tokens.reshape(B, height // p, width // p, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, height, width)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2D sin-cos position embedding, (grid_size**2, dim), rows in patchify order.

    Half of the channels encode the row and half the column, each as
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for the 2D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos):  # (G*G,) -> (G*G, dim/2)
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def timestep_sinusoid(t, dim, max_period=10000):
    """(B,) timesteps -> (B, dim) float32 [cos(t w_k), sin(t w_k)], w_k = max_period^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, dim): sinusoid then a 2-layer MLP, always in float32.

    Autocast would run the two linears in bf16, whose 8-bit mantissa rounds the sinusoid
    features to steps of up to 2^-8: the low-frequency features of neighbouring timesteps,
    which differ by about w_k << 2^-8, would become equal. So autocast is switched off here
    (the sinusoid itself is element-wise, which autocast leaves in float32 anyway).
    """

    def __init__(self, dim, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        with torch.autocast(t.device.type, enabled=False):
            return self.mlp(timestep_sinusoid(t, self.frequency_dim))


# ----------------------------------------------------------------------------------------
# Transformer blocks

def modulate(x, shift, scale):
    """adaLN: x (B, N, dim) normalised, then x * (1 + scale) + shift with (B, dim) shift/scale."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class DiTBlock(nn.Module):
    """Self-attention and MLP, each modulated and gated by the time embedding t_emb (adaLN-Zero).

        h = h + gate_msa * Attn(modulate(LN(h), shift_msa, scale_msa))
        h = h + gate_mlp * MLP(modulate(LN(h), shift_mlp, scale_mlp))
    """

    def __init__(self, dim, heads, mlp_ratio=4.0, gelu_approximate="tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), gelu_approximate)
        # t_emb (B, dim) -> six (B, dim) vectors; zero-initialised, so each block starts as identity
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, h, t_emb):  # h: (B, N, dim), t_emb: (B, dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(t_emb).chunk(6, dim=-1)
        h = h + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(h), shift_msa, scale_msa))
        h = h + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))
        return h


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map from dim to one patch's pixels."""

    def __init__(self, dim, patch_size, channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h, t_emb):  # (B, N, dim), (B, dim) -> (B, N, p*p*C)
        shift, scale = self.adaLN_modulation(t_emb).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))


# ----------------------------------------------------------------------------------------
# The model

class DiT(nn.Module):
    """Unconditional DiT noise predictor: forward(x, t) -> eps_hat with x's shape."""

    kind = "unconditional"  # written into checkpoints: each script recognises its own model
    # Model A takes no label. Generic code asks `model.num_classes` (0 here, the number of
    # digits for model B) rather than dispatching on `kind`.
    num_classes = 0

    def __init__(self, img_size=64, channels=1, patch_size=2, dim=256, depth=6, heads=8,
                 mlp_ratio=4.0, gelu_approximate="tanh"):
        super().__init__()
        check_model_shape(img_size, channels, patch_size, dim, depth, heads, mlp_ratio, gelu_approximate)
        self.config = dict(img_size=img_size, channels=channels, patch_size=patch_size, dim=dim,
                           depth=depth, heads=heads, mlp_ratio=mlp_ratio, gelu_approximate=gelu_approximate)
        self.img_size, self.channels, self.patch_size = img_size, channels, patch_size
        self.grid_size = img_size // patch_size  # tokens per side; N = grid_size**2

        self.patch_embed = nn.Linear(patch_size * patch_size * channels, dim)
        # fixed, so not saved in checkpoints: rebuilt from the config
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid_size)[None],
                             persistent=False)  # (1, N, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList([self.make_block(dim, heads, mlp_ratio, gelu_approximate)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(dim, patch_size, channels)
        self.initialize_weights()

    def make_block(self, dim, heads, mlp_ratio, gelu_approximate):
        return DiTBlock(dim, heads, mlp_ratio, gelu_approximate)

    def initialize_weights(self):
        """DiT's initialisation, in one place: Xavier-uniform linears with zero biases,
        N(0, 0.02) timestep MLP, and zeroed adaLN modulations and output layer, so that
        every block starts as the identity and the model's first prediction is 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_input(self, x, t):
        expected = (self.channels, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected x of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")

    def embed(self, x, t):
        """x (B, C, H, W), t (B,) -> tokens (B, N, dim) with their positions added, time embedding (B, dim)."""
        self.check_input(x, t)
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed
        return tokens, self.t_embedder(t)

    def unembed(self, h, t_emb):
        """tokens (B, N, dim), time embedding (B, dim) -> eps_hat (B, C, H, W)."""
        out = self.final_layer(h, t_emb)
        return unpatchify(out, self.patch_size, self.channels, self.img_size, self.img_size)

    def forward(self, x, t):
        h, t_emb = self.embed(x, t)
        for block in self.blocks:
            h = block(h, t_emb)
        return self.unembed(h, t_emb)


class ModelConfigError(ValueError):
    """A model shape that cannot be built; the message names the option."""


def check_model_shape(img_size, channels, patch_size, dim, depth, heads, mlp_ratio, gelu_approximate):
    """Raise ValueError, naming the option, for a shape (or GELU) the model cannot have."""
    for name, value in (("img_size", img_size), ("channels", channels),
                        ("patch_size", patch_size), ("dim", dim), ("depth", depth),
                        ("heads", heads)):
        if not isinstance(value, int) or value < 1:
            raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
    if img_size % patch_size:
        raise ModelConfigError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
    if dim % heads:
        raise ModelConfigError(f"dim ({dim}) must be divisible by heads ({heads})")
    if dim % 4:
        raise ModelConfigError(f"dim ({dim}) must be divisible by 4 (2D sin-cos position embedding)")
    if not mlp_ratio > 0:
        raise ModelConfigError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
    if gelu_approximate not in GELU_APPROXIMATIONS:
        raise ModelConfigError(f"gelu_approximate must be one of {GELU_APPROXIMATIONS}, got {gelu_approximate!r}")
