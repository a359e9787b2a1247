"""Exponential moving average of a model's weights, used for sampling by default."""
import copy

import torch


class EMA:
    """ema <- ema + (1 - d) (model - ema) after every optimizer step.

    The effective decay at the n-th update, d = min(decay, (1 + n) / (10 + n)), warms up from
    2/11 (n = 1), so that a short run's average is not dominated by the random initial weights.
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)  # starts as a copy

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict, num_updates):
        self.module.load_state_dict(state_dict)
        self.num_updates = num_updates
