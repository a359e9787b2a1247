"""EMA and the learning-rate schedule, against their closed forms."""
from types import SimpleNamespace

import torch

from ema import EMA
from training import learning_rate


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


def test_learning_rate_warmup_then_step_decay():
    args = SimpleNamespace(lr=1e-3, warmup_steps=10, lr_decay_step=2, lr_decay_rate=0.5)
    steps_per_epoch = 100
    assert learning_rate(args, 0, steps_per_epoch) == 1e-4          # (0 + 1) / 10 of the peak
    assert learning_rate(args, 9, steps_per_epoch) == 1e-3
    assert learning_rate(args, 199, steps_per_epoch) == 1e-3         # still epochs 1-2
    assert learning_rate(args, 200, steps_per_epoch) == 5e-4         # epoch 3: one decay
    assert learning_rate(args, 450, steps_per_epoch) == 2.5e-4       # epoch 5: two
    args.lr_decay_step = None
    assert learning_rate(args, 10_000, steps_per_epoch) == 1e-3
