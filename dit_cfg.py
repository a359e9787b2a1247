"""Model B: a class-conditional DiT whose label enters through cross-attention.

    y (B,) --ConditionEncoder--> c_tokens (B, N2, dim)          N2 = cond_tokens >= 2
    in every block:  h = h + CrossAttn(LN(h), c_tokens)       queries: image tokens h (B, N1, dim)
                     h = DiTBlock(h, t_emb)                   adaLN-Zero on the time step, as in model A

Label y = num_classes is the learned "null" label: during training a share
`cond_drop_prob` of the labels is replaced by it, so the same network also learns the
unconditional prediction that classifier-free guidance needs.

Everything but the cross-attention and the condition encoder comes from dit.py.
"""
import torch
import torch.nn as nn

from dit import DiT, DiTBlock, ModelConfigError, attention, merge_heads, split_heads


class CrossAttention(nn.Module):
    """Image tokens attend to condition tokens: softmax(Q K^T / sqrt(d)) V.

    Q comes from h (B, N1, dim); K and V from any condition tensor c (B, N2, dim), so a
    richer condition (a text encoder's output, say) plugs in without touching the block.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def context_kv(self, c):
        """c (B, N2, dim) -> keys and values, each (B, heads, N2, dim/heads).

        Separate from forward so that a sampler can compute them once per run: the
        condition does not change with t."""
        k, v = self.kv(c).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, h, c=None, kv=None):  # h: (B, N1, dim) -> (B, N1, dim)
        k, v = self.context_kv(c) if kv is None else kv
        return self.proj(merge_heads(attention(split_heads(self.q(h), self.heads), k, v)))


class CrossDiTBlock(DiTBlock):
    """A DiT block preceded by a residual cross-attention to the condition tokens."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__(dim, heads, mlp_ratio)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(dim, heads)

    def forward(self, h, c, kv):  # h (B, N1, dim), c = time embedding (B, dim), kv from context_kv
        h = h + self.cross_attn(self.norm_cross(h), kv=kv)
        return super().forward(h, c)


class ConditionEncoder(nn.Module):
    """Label y -> a learned sequence of `cond_tokens` tokens: (B,) -> (B, N2, dim).

    Why several tokens: with a single key, softmax over one element is always 1, so every
    image token would receive the same vector (a per-label bias, not attention). With
    N2 >= 2 distinct tokens each image token weighs them by its own query.

    Row `num_classes` of the table is the null label. In train mode each label is
    replaced by it with probability `drop_prob` (condition dropout for CFG training);
    `drop_all=True` replaces every label (the unconditional branch of guidance).
    """

    def __init__(self, num_classes, dim, cond_tokens, drop_prob):
        super().__init__()
        self.null_label = num_classes
        self.cond_tokens, self.dim, self.drop_prob = cond_tokens, dim, drop_prob
        self.table = nn.Embedding(num_classes + 1, cond_tokens * dim)

    def drop_labels(self, y, drop_all=False):
        if drop_all:
            return torch.full_like(y, self.null_label)
        if self.training and self.drop_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.drop_prob
            return torch.where(drop, torch.full_like(y, self.null_label), y)
        return y

    def forward(self, y, drop_all=False):
        y = self.drop_labels(y, drop_all)
        return self.table(y).view(y.shape[0], self.cond_tokens, self.dim)  # (B, N2, dim)


class ConditionalDiT(DiT):
    """Class-conditional DiT noise predictor: forward(x, t, y) -> eps_hat with x's shape."""

    kind = "dit_cfg"

    def __init__(self, img_size=32, channels=1, patch_size=4, num_classes=10, dim=256, depth=6,
                 heads=8, mlp_ratio=4.0, cond_tokens=4, cond_drop_prob=0.1):
        if not isinstance(cond_tokens, int) or cond_tokens < 2:
            raise ModelConfigError(f"cond_tokens must be an integer >= 2, got {cond_tokens!r}: with one "
                             "condition token cross-attention degenerates into a constant bias")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ModelConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0 <= cond_drop_prob <= 1:
            raise ModelConfigError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob!r}")
        super().__init__(img_size, channels, patch_size, dim, depth, heads, mlp_ratio)
        self.config.update(num_classes=num_classes, cond_tokens=cond_tokens,
                           cond_drop_prob=cond_drop_prob)
        self.num_classes = num_classes
        self.cond_encoder = ConditionEncoder(num_classes, dim, cond_tokens, cond_drop_prob)

    @property
    def null_label(self):
        return self.cond_encoder.null_label

    def make_block(self, dim, heads, mlp_ratio):
        return CrossDiTBlock(dim, heads, mlp_ratio)

    def initialize_weights(self):
        super().initialize_weights()
        # the cross-attention branch starts silent too, like every residual branch of DiT;
        # the condition table keeps nn.Embedding's N(0, 1), so keys and values start at unit scale
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def condition_kv(self, y, drop_all=False):
        """Labels (B,) -> per-block cross-attention keys and values (computed once per sampling run)."""
        c_tokens = self.cond_encoder(y, drop_all)  # (B, N2, dim)
        return [block.cross_attn.context_kv(c_tokens) for block in self.blocks]

    def forward(self, x, t, y=None, drop_all=False, cond_kv=None):
        """x (B, C, H, W), t (B,), y (B,) labels in [0, num_classes] -> eps_hat (B, C, H, W).

        Pass `cond_kv` (from `condition_kv`) instead of y to reuse precomputed keys/values."""
        if cond_kv is None:
            if y is None or y.shape != (x.shape[0],):
                raise ValueError(f"expected labels y of shape ({x.shape[0]},), "
                                 f"got {None if y is None else tuple(y.shape)}")
            cond_kv = self.condition_kv(y, drop_all)
        h, c = self.embed(x, t)
        for block, kv in zip(self.blocks, cond_kv):
            h = block(h, c, kv)
        return self.unembed(h, c)
