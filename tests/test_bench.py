"""bench.py's FLOP count, the basis of its GFLOP/s and share-of-peak figures, against a
count written out by hand from the architecture; and its option checks."""
import sys

import pytest
import torch

import bench
from bench import count_flops, make_step, training_step_flops
from cli import run_main
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


def test_bad_options_stop_before_any_timing(tmp_path, monkeypatch, capsys):
    """An unknown precision, or a --json that cannot be written, ends in one line before the
    minutes of timing (the JSON used to be opened only at the very end)."""
    def never(*args, **kwargs):
        pytest.fail("timing started although an option was bad")

    monkeypatch.setattr(bench, "matmul_peak", never)
    for argv, expected in ((["--precisions", "fp32,fp16"], "expected fp32, bf16 or both"),
                           (["--json", str(tmp_path / "missing" / "b.json")], "output folder does not exist")):
        monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
        with pytest.raises(SystemExit) as exit_info:
            run_main(bench.main)
        message = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err
        assert expected in message and len(message.strip().splitlines()) == 1, message
