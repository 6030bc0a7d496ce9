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


def problem(make_optimizer, seed=0):
    """A float64 MLP whose optimizer state is warm (a few steps taken), with fresh gradients of one more batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
    x_meta, y_meta = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    optimizer = make_optimizer(model.parameters())
    for i in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[16 * i: 16 * i + 16]), y[16 * i: 16 * i + 16]).backward()
        optimizer.step()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()

    def meta_loss():
        return nn.functional.cross_entropy(model(x_meta), y_meta)

    return model, optimizer, meta_loss


def step_with_lr(model, optimizer, make_optimizer, weights, grads, state, lr):
    """Take the pending step from (weights, grads, optimizer state) with a given lr, on a fresh optimizer."""
    with torch.no_grad():
        for p, w, g in zip(model.parameters(), weights, grads):
            p.copy_(w)
            p.grad = g.clone()
    fresh = make_optimizer(model.parameters())
    fresh.load_state_dict(copy.deepcopy(state))  # state_dict() holds live tensors: copy, or both optimizers share them
    for group in fresh.param_groups:
        group["lr"] = lr
    fresh.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_hypergradient_matches_central_finite_differences(name):
    make_optimizer = OPTIMIZERS[name]
    model, optimizer, meta_loss = problem(make_optimizer)
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    alpha = optimizer.param_groups[0]["lr"]

    def loss_after_step(lr):
        step_with_lr(model, optimizer, make_optimizer, weights, grads, state, lr)
        return meta_loss().item()

    eps = alpha * 1e-5
    finite_difference = (loss_after_step(alpha + eps) - loss_after_step(alpha - eps)) / (2 * eps)

    # Fast path: the real step is the lookahead step; dL/dalpha = <g_meta, delta> / alpha.
    learner = MetaLearner(MLRSNet(), list(model.parameters()), interval=1, meta_lr=1e-3, weight_decay=0, max_steps=10)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    learner.remember_weights()
    step_with_lr(model, optimizer, make_optimizer, weights, grads, state, alpha)
    learner.weights_to_delta()
    meta_grads = torch.autograd.grad(meta_loss(), learner.params)
    hypergrad = learner.local_dot(meta_grads).item() / alpha

    assert abs(finite_difference) > 1e-3  # a meaningful slope, not two zeros agreeing
    assert abs(hypergrad - finite_difference) <= 1e-5 * abs(finite_difference)


@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adamw"])
def test_rescaled_step_equals_a_step_taken_with_the_new_lr(name):
    """w_old + (alpha'/alpha) delta == the step with alpha': the exactness of the paper's update-then-step order."""
    make_optimizer = OPTIMIZERS[name]
    model, optimizer, _ = problem(make_optimizer)
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    alpha, alpha_new = optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["lr"] * 0.37

    step_with_lr(model, optimizer, make_optimizer, weights, grads, state, alpha_new)
    direct = [p.detach().clone() for p in model.parameters()]

    learner = MetaLearner(MLRSNet(), list(model.parameters()), interval=1, meta_lr=1e-3, weight_decay=0, max_steps=10)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    learner.remember_weights()
    step_with_lr(model, optimizer, make_optimizer, weights, grads, state, alpha)
    learner.weights_to_delta()
    learner.rescale(alpha_new / alpha)
    for p, d in zip(model.parameters(), direct):
        torch.testing.assert_close(p.detach(), d, rtol=0, atol=1e-13)


def test_schedule_net_gradient_matches_finite_differences():
    """dL_meta/dtheta through the net (one scalar of theta: the head bias) against finite differences."""
    make_optimizer = OPTIMIZERS["sgd_momentum_wd"]
    model, optimizer, meta_loss = problem(make_optimizer)
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    torch.manual_seed(1)
    net = MLRSNet(output_bias_init=0.0).double()
    x, gamma = torch.tensor([[0.8]], dtype=torch.float64), 0.3
    bias = net.stages[-1].head.bias

    def loss_for_bias(value):
        with torch.no_grad():
            bias.fill_(value)
            lr = gamma * net(x, None)[0].item()
        step_with_lr(model, optimizer, make_optimizer, weights, grads, state, lr)
        return meta_loss().item()

    b0, eps = 0.0, 1e-6
    finite_difference = (loss_for_bias(b0 + eps) - loss_for_bias(b0 - eps)) / (2 * eps)

    with torch.no_grad():
        bias.fill_(b0)
    learner = MetaLearner(net, list(model.parameters()), interval=1, meta_lr=1e-3, weight_decay=0, max_steps=10)
    lr = gamma * net(x, None)[0].reshape(())
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    learner.remember_weights()
    step_with_lr(model, optimizer, make_optimizer, weights, grads, state, lr.item())
    learner.weights_to_delta()
    hypergrad = learner.local_dot(torch.autograd.grad(meta_loss(), learner.params)).item() / lr.item()
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
