"""bench.py's FLOP count, the basis of its GFLOP/s and share-of-peak figures, against a
count written out by hand from the architecture."""
import torch

from bench import count_flops, make_step, training_step_flops
from dit import DiT
from dit_cfg import ConditionalDiT


def dit_forward_flops(B, N, dim, depth, mlp_ratio, pixels_per_patch, cond_tokens=0, frequency_dim=256):
    """2 * M * K * N for every matmul of one forward pass."""
    hidden = int(dim * mlp_ratio)
    per_token_block = 3 * dim * dim + dim * dim + 2 * dim * hidden      # qkv, proj, mlp
    attention = 2 * N * dim                                             # q k^T and (weights) v
    flops = depth * 2 * B * N * (per_token_block + attention)
    flops += depth * 2 * B * dim * 6 * dim                              # adaLN of each block
    if cond_tokens:
        flops += depth * 2 * B * N * (2 * dim * dim + 2 * cond_tokens * dim)   # q, proj, attention
        flops += depth * 2 * B * cond_tokens * 2 * dim * dim                  # k, v of the condition
    flops += 2 * B * N * pixels_per_patch * dim * 2                     # patch embed, final linear
    flops += 2 * B * dim * 2 * dim                                      # final adaLN
    flops += 2 * B * (frequency_dim * dim + dim * dim)                  # timestep MLP
    return flops


def test_forward_flops_of_both_models_match_the_hand_count():
    x = torch.randn(3, 1, 16, 16)
    t = torch.randint(0, 1000, (3,))
    a = DiT(img_size=16, patch_size=4, dim=32, depth=2, heads=4, mlp_ratio=2.0)
    assert count_flops(lambda: a(x, t)) == dit_forward_flops(3, 16, 32, 2, 2.0, 16)
    b = ConditionalDiT(img_size=16, patch_size=2, dim=32, depth=3, heads=4, cond_tokens=5)
    y = torch.tensor([0, 4, 10])
    assert count_flops(lambda: b(x, t, y)) == dit_forward_flops(3, 64, 32, 3, 4.0, 4, cond_tokens=5)


def test_training_step_flops_scale_exactly_from_one_image():
    """bench counts a step on one image and multiplies by the batch; the direct count at the
    full batch must agree to the FLOP, for both models (self- and cross-attention)."""
    cpu = torch.device("cpu")
    for model_class in (DiT, ConditionalDiT):
        spec = dict(model_class=model_class, config=dict(img_size=8, patch_size=2, dim=32, depth=2, heads=4),
                    batch=5)
        _, full_batch_step, _ = make_step(spec, cpu, None)
        assert training_step_flops(spec, cpu, None) == count_flops(full_batch_step)
