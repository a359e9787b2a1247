"""Model B: a class-conditional DiT whose label enters through cross-attention.

    y (B,) --ConditionEncoder--> cond_tokens (B, N2, dim)       N2 >= 2
    in every block:  h = h + CrossAttn(LN(h), cond_tokens)    queries: image tokens h (B, N1, dim)
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

    Q comes from h (B, N1, dim); K and V from any condition tensor (B, N2, dim), so a richer
    condition (a text encoder's output, say) plugs in without touching the block.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h, cond_tokens):  # h: (B, N1, dim), cond_tokens: (B, N2, dim) -> (B, N1, dim)
        k, v = self.kv(cond_tokens).chunk(2, dim=-1)  # 2 x (B, N2, dim)
        q = split_heads(self.q(h), self.heads)
        out = attention(q, split_heads(k, self.heads), split_heads(v, self.heads))
        return self.proj(merge_heads(out))


class CrossDiTBlock(DiTBlock):
    """A DiT block preceded by a residual cross-attention to the condition tokens."""

    def __init__(self, dim, heads, mlp_ratio=4.0, gelu_approximate="tanh"):
        super().__init__(dim, heads, mlp_ratio, gelu_approximate)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(dim, heads)

    def forward(self, h, t_emb, cond_tokens):  # h (B, N1, dim), t_emb (B, dim), cond_tokens (B, N2, dim)
        h = h + self.cross_attn(self.norm_cross(h), cond_tokens)
        return super().forward(h, t_emb)


class ConditionEncoder(nn.Module):
    """Label y -> a learned sequence of `cond_tokens` tokens: (B,) -> (B, N2, dim).

    Why several tokens: with a single key, softmax over one element is always 1, so every
    image token would receive the same vector (a per-label bias, not attention). With
    N2 >= 2 distinct tokens each image token weighs them by its own query.

    Row `num_classes` of the table is the null label. In train mode each label is
    replaced by it with probability `drop_prob` (condition dropout for CFG training).
    """

    def __init__(self, num_classes, dim, cond_tokens, drop_prob):
        super().__init__()
        self.null_label = num_classes
        self.cond_tokens, self.dim, self.drop_prob = cond_tokens, dim, drop_prob
        self.table = nn.Embedding(num_classes + 1, cond_tokens * dim)

    def drop_labels(self, y):
        if self.training and self.drop_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.drop_prob
            return torch.where(drop, torch.full_like(y, self.null_label), y)
        return y

    def forward(self, y):
        y = self.drop_labels(y)
        return self.table(y).view(y.shape[0], self.cond_tokens, self.dim)  # (B, N2, dim)


class ConditionalDiT(DiT):
    """Class-conditional DiT noise predictor: forward(x, t, y) -> eps_hat with x's shape."""

    kind = "class_conditional"

    def __init__(self, img_size=32, channels=1, patch_size=4, num_classes=10, dim=256, depth=6,
                 heads=8, mlp_ratio=4.0, cond_tokens=4, cond_drop_prob=0.1, gelu_approximate="tanh"):
        if not isinstance(cond_tokens, int) or cond_tokens < 2:
            raise ModelConfigError(f"cond_tokens must be an integer >= 2, got {cond_tokens!r}: with one "
                                   "condition token cross-attention degenerates into a constant bias")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ModelConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not 0 <= cond_drop_prob <= 1:
            raise ModelConfigError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob!r}")
        super().__init__(img_size, channels, patch_size, dim, depth, heads, mlp_ratio, gelu_approximate)
        self.config.update(num_classes=num_classes, cond_tokens=cond_tokens,
                           cond_drop_prob=cond_drop_prob)
        self.num_classes = num_classes
        self.cond_encoder = ConditionEncoder(num_classes, dim, cond_tokens, cond_drop_prob)

    @property
    def null_label(self):
        return self.cond_encoder.null_label

    def make_block(self, dim, heads, mlp_ratio, gelu_approximate):
        return CrossDiTBlock(dim, heads, mlp_ratio, gelu_approximate)

    def initialize_weights(self):
        super().initialize_weights()
        # the cross-attention branch starts silent too, like every residual branch of DiT;
        # the condition table keeps nn.Embedding's N(0, 1), so keys and values start at unit scale
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def forward(self, x, t, y):
        """x (B, C, H, W), t (B,), y (B,) labels in [0, num_classes] -> eps_hat (B, C, H, W).

        y = num_classes (null_label) asks for the unconditional prediction."""
        if y is None or y.shape != (x.shape[0],):
            raise ValueError(f"expected labels y of shape ({x.shape[0]},), "
                             f"got {None if y is None else tuple(y.shape)}")
        cond_tokens = self.cond_encoder(y)  # (B, N2, dim)
        h, t_emb = self.embed(x, t)
        for block in self.blocks:
            h = block(h, t_emb, cond_tokens)
        return self.unembed(h, t_emb)
