"""Moving averages of a model's weights: the EMA that sampling uses by default, and the
power-function average that model A's --guide_ema_power makes its guide from."""
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

    def decay_at(self, n):
        """d of the n-th update (n = 1, 2, ...)."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict, num_updates):
        self.module.load_state_dict(state_dict)
        self.num_updates = num_updates

    def over(self, model, state_dict):
        """This average (its kind, settings and count) over another network, `model`, whose
        averaged weights are `state_dict`: how growing the network carries an average over."""
        average = copy.copy(self)
        average.module = copy.deepcopy(model).eval().requires_grad_(False)
        average.load_state_dict(state_dict, self.num_updates)
        return average


class PowerEMA(EMA):
    """The power-function average of EDM2 (Karras et al., "Analyzing and Improving the
    Training Dynamics of Diffusion Models", CVPR 2024, section 3.1):

        avg_n = avg_{n-1} + (1 - d_n) (theta_n - avg_{n-1}),   d_n = (1 - 1/n)^(gamma + 1)

    After n updates the weights of step k weigh (k/n)^(gamma+1) - ((k-1)/n)^(gamma+1), about
    (gamma + 1) k^gamma / n^(gamma+1): the average always spans the same share of the run, the
    wider the smaller gamma (its relative width sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))):
    0.19 at gamma 2). EMA's warm-up d = (1 + n) / (10 + n) is this profile at gamma about 8
    (sigma_rel 0.09) for the first (10 d - 1) / (1 - d) updates (about 9000 at d = 0.999)."""

    def __init__(self, model, gamma):
        super().__init__(model, decay=None)
        self.gamma = gamma

    def decay_at(self, n):
        return (1 - 1 / n) ** (self.gamma + 1)
