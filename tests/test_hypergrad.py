"""The fast meta-gradient against float64 central finite differences of the meta loss (mlrsnet.md section 4)."""

import copy

import pytest
import torch
from torch import nn

from hf_mlrs import MLRSNet
from hf_mlrs.hypergrad import MetaLearner, lr_linearity_problem


OPTIMIZERS = {
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov_wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
    "rmsprop_momentum": lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.5),
}


class PendingStep:
    """A float64 MLP with a warm optimizer (a few steps taken) and the fresh gradients of one more batch.

    The pending step can be taken, again and again, with any lr on a fresh copy of the optimizer state.
    """

    def __init__(self, make_optimizer, seed=0):
        torch.manual_seed(seed)
        self.make_optimizer = make_optimizer
        self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
        self.x_meta, self.y_meta = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
        optimizer = make_optimizer(self.model.parameters())
        for i in range(4):
            optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(x[16 * i: 16 * i + 16]), y[16 * i: 16 * i + 16]).backward()
            optimizer.step()
        optimizer.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.lr = optimizer.param_groups[0]["lr"]
        self.weights = [p.detach().clone() for p in self.model.parameters()]
        self.grads = [p.grad.clone() for p in self.model.parameters()]
        # state_dict() holds live tensors: copy it, or every optimizer built from it shares the same buffers
        self.state = copy.deepcopy(optimizer.state_dict())

    def meta_loss(self):
        return nn.functional.cross_entropy(self.model(self.x_meta), self.y_meta)

    def take(self, lr):
        with torch.no_grad():
            for p, w, g in zip(self.model.parameters(), self.weights, self.grads):
                p.copy_(w)
                p.grad = g.clone()
        optimizer = self.make_optimizer(self.model.parameters())
        optimizer.load_state_dict(copy.deepcopy(self.state))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()

    def take_with_learner(self, lr, net=None) -> MetaLearner:
        """The fast path: the real step, bracketed by the learner's one buffer (w_old, then delta)."""
        learner = MetaLearner(net or MLRSNet(), list(self.model.parameters()), interval=1, meta_lr=1e-3,
                              weight_decay=0, max_steps=10)
        with torch.no_grad():
            for p, w in zip(self.model.parameters(), self.weights):
                p.copy_(w)
        learner.remember_weights()
        self.take(lr)
        learner.weights_to_delta()
        return learner

    def hypergradient(self, learner, lr):
        """dL/dalpha = <g_meta, delta> / alpha."""
        return learner.local_dot(torch.autograd.grad(self.meta_loss(), learner.params)).item() / lr

    def meta_loss_after(self, lr):
        self.take(lr)
        return self.meta_loss().item()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_hypergradient_matches_central_finite_differences(name):
    pending = PendingStep(OPTIMIZERS[name])
    alpha = pending.lr
    eps = alpha * 1e-5
    finite_difference = (pending.meta_loss_after(alpha + eps) - pending.meta_loss_after(alpha - eps)) / (2 * eps)
    hypergrad = pending.hypergradient(pending.take_with_learner(alpha), alpha)
    assert abs(finite_difference) > 1e-3  # a meaningful slope, not two zeros agreeing
    assert abs(hypergrad - finite_difference) <= 1e-5 * abs(finite_difference)


@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adamw"])
def test_rescaled_step_equals_a_step_taken_with_the_new_lr(name):
    """w_old + (alpha'/alpha) delta == the step with alpha': the exactness of the paper's update-then-step order."""
    pending = PendingStep(OPTIMIZERS[name])
    alpha, alpha_new = pending.lr, pending.lr * 0.37
    pending.take(alpha_new)
    direct = [p.detach().clone() for p in pending.model.parameters()]
    pending.take_with_learner(alpha).rescale(alpha_new / alpha)
    for p, d in zip(pending.model.parameters(), direct):
        torch.testing.assert_close(p.detach(), d, rtol=0, atol=1e-13)


def test_schedule_net_gradient_matches_finite_differences():
    """dL_meta/dtheta through the net (one scalar of theta: the head bias) against finite differences."""
    pending = PendingStep(OPTIMIZERS["sgd_momentum_wd"])
    torch.manual_seed(1)
    net = MLRSNet(output_bias_init=0.0).double()
    x, gamma = torch.tensor([[0.8]], dtype=torch.float64), 0.3
    bias = net.stages[-1].head.bias

    def loss_for_bias(value):
        with torch.no_grad():
            bias.fill_(value)
            lr = gamma * net(x, None)[0].item()
        return pending.meta_loss_after(lr)

    b0, eps = 0.0, 1e-6
    finite_difference = (loss_for_bias(b0 + eps) - loss_for_bias(b0 - eps)) / (2 * eps)

    with torch.no_grad():
        bias.fill_(b0)
    lr = gamma * net(x, None)[0].reshape(())
    learner = pending.take_with_learner(lr.item(), net)
    hypergrad = pending.hypergradient(learner, lr.item())
    learner.meta_optimizer.zero_grad()
    lr.backward(torch.tensor(hypergrad, dtype=lr.dtype))
    assert abs(finite_difference) > 1e-4
    assert abs(bias.grad.item() - finite_difference) <= 1e-5 * abs(finite_difference)


@pytest.mark.parametrize(
    "cls, defaults, ok",
    [
        (torch.optim.SGD, {}, True),
        (torch.optim.AdamW, {}, True),
        (torch.optim.ASGD, {}, False),
        (torch.optim.Rprop, {}, False),
        (torch.optim.LBFGS, {}, False),
    ],
)
def test_lr_linearity_check_for_torch_optimizers(cls, defaults, ok):
    assert (lr_linearity_problem(cls, defaults) is None) == ok


def test_lr_linearity_check_refuses_learning_rate_free_optimizers():
    import prodigyopt
    import schedulefree
    from transformers.optimization import Adafactor

    assert "Schedule-Free" in lr_linearity_problem(schedulefree.AdamWScheduleFree, {})
    assert "Prodigy" in lr_linearity_problem(prodigyopt.Prodigy, {})
    assert "relative_step" in lr_linearity_problem(Adafactor, {"relative_step": True})
    assert lr_linearity_problem(Adafactor, {"relative_step": False, "warmup_init": False}) is None

    class MyOptimizer(torch.optim.Optimizer):
        pass

    assert "mlrs_assume_lr_linear" in lr_linearity_problem(MyOptimizer, {})
