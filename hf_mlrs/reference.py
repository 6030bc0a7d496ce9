"""A slow, readable MLR-SNet meta-training loop, done the way the official code does it.

Used only as a test oracle and as a benchmark peer for the fast path in `hypergrad.py` / `trainer.py`.
The meta-update copies the model, takes a *virtual* optimizer step w' = w - alpha(theta) * d with alpha still in the
autograd graph, evaluates the meta loss on the copy at w', and backpropagates into theta (official
`meta-train/image-classification/meta_train.py`). The optimizer direction d is recomputed here from the optimizer's
state with the textbook formulas of SGD and Adam(W), independently of torch's implementations.

One deliberate difference from the official script: there the LSTM state is advanced twice on a meta step (once in
the virtual step, once for the real step). Here, as in hf_mlrs, the real step's lr alpha'_t is computed from the
same input and the same h_{t-1} as the virtual step, with the updated theta: the net advances once per step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .modeling import MLRSNet


def optimizer_direction(optimizer: torch.optim.Optimizer, param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor):
    """w' - w for one parameter, as the optimizer's next step would take it with lr `lr` (a tensor in the graph).

    Reads, but never writes, the optimizer's state. Supports SGD (momentum, dampening, Nesterov, weight decay),
    Adam (L2 weight decay) and AdamW (decoupled weight decay).
    """
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    state = optimizer.state.get(param, {})
    w = param.detach()
    if isinstance(optimizer, torch.optim.SGD):
        d = grad + group["weight_decay"] * w
        if group["momentum"]:
            buf = state.get("momentum_buffer")
            buf = d if buf is None else group["momentum"] * buf + (1 - group["dampening"]) * d
            d = d + group["momentum"] * buf if group["nesterov"] else buf
        return -lr * d
    if isinstance(optimizer, torch.optim.Adam) and not group.get("amsgrad", False):  # AdamW subclasses Adam
        beta1, beta2 = group["betas"]
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        g = grad if decoupled else grad + group["weight_decay"] * w
        step = float(state.get("step", 0)) + 1
        m = beta1 * state.get("exp_avg", torch.zeros_like(w)) + (1 - beta1) * g
        v = beta2 * state.get("exp_avg_sq", torch.zeros_like(w)) + (1 - beta2) * g * g
        update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + group["eps"])
        decay = group["weight_decay"] * w if decoupled else 0.0
        return -lr * (update + decay)
    raise NotImplementedError(f"reference: no textbook formula for {type(optimizer).__name__}")


def normalized_input(schedule: MLRSNet, loss: float, initial_loss: float, num_labels: int | None) -> float:
    if schedule.input_normalization == "initial_loss":
        return loss / initial_loss
    if schedule.input_normalization == "log_num_labels":
        return loss / math.log(num_labels)
    return loss


def reference_meta_train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: MLRSNet,
    *,
    gamma: float,
    train_batches: Sequence[dict],
    meta_batches: Callable[[int], dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    interval: int,
    meta_lr: float = 1e-3,
    weight_decay: float = 1e-4,
    max_grad_norm: float = 0.0,
    num_labels: int | None = None,
) -> dict:
    """Train `model` on `train_batches` with lrs from `schedule`, meta-training its last stage every `interval` steps.

    `meta_batches(m)` gives the m-th meta batch; `loss_fn(module, batch)` the mean loss. Returns the lr of every
    step (after the meta-update, i.e. the lr the step used), the meta losses and the final recurrent state.
    """
    meta_optimizer = torch.optim.Adam(schedule.stages[-1].parameters(), lr=meta_lr, weight_decay=weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = schedule.init_state()
    lrs, meta_losses, initial_loss = [], [], None
    for t, batch in enumerate(train_batches):
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        initial_loss = initial_loss if initial_loss is not None else loss.item()
        x = torch.tensor([[normalized_input(schedule, loss.item(), initial_loss, num_labels)]])

        if (t + 1) % interval == 0:
            # The official meta step: a copy of the model, a virtual step in the graph, the meta loss on the copy.
            copy_of_model = copy.deepcopy(model)
            out, _ = schedule(x, state, stage=-1)
            alpha = gamma * out.reshape(())
            names = [n for n, p in model.named_parameters() if any(p is q for q in params)]
            virtual = {
                name: p.detach() + optimizer_direction(optimizer, p, p.grad.detach(), alpha)
                for name, p in zip(names, params)
            }
            def at_virtual_weights(copy_of_model=copy_of_model, virtual=virtual, **inputs):
                return functional_call(copy_of_model, virtual, (), inputs)

            meta_loss = loss_fn(at_virtual_weights, meta_batches(t // interval))
            meta_optimizer.zero_grad()
            meta_loss.backward()
            meta_optimizer.step()
            meta_losses.append(meta_loss.item())

        with torch.no_grad():
            out, state = schedule(x, state, stage=-1)  # the real step's lr, from the (updated) net
        lr = gamma * out.item()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        lrs.append(lr)
    return {"lrs": lrs, "meta_losses": meta_losses, "state": state}


def paper_style_trainer_class():
    """MLRSTrainer with the official meta-step in place of the fast one: the benchmark peer of `MLRSTrainer`.

    Imported lazily (transformers) so that `reference_meta_train` stays a pure PyTorch oracle.
    """
    from .metastep import MetaStep
    from .trainer import MLRSTrainer

    class PaperStyleMetaStep(MetaStep):
        """Before a due step: copy the model, take the virtual step w' = w - alpha(theta) d in the graph, evaluate the
        meta loss on the copy at w', backpropagate into theta, then step with the updated net's lr."""

        def before_step(self, loss: float) -> None:
            trainer, scheduler, learner = self.trainer, self.scheduler, self.scheduler.meta_learner
            if not learner.is_due(trainer.state.global_step):
                scheduler.observe(loss)
                return
            x = scheduler.prepare_input(loss)
            alpha, _ = scheduler.compute_lr(x)
            model = trainer.accelerator.unwrap_model(trainer.model)
            optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            copy_of_model = copy.deepcopy(model)
            by_id = {id(p): name for name, p in model.named_parameters()}
            virtual = {by_id[id(p)]: p.detach() + optimizer_direction(optimizer, p, p.grad.detach(), alpha)
                       for p in learner.params}
            inputs = self.meta_batch(learner.advance())
            meta_loss = functional_call(copy_of_model, virtual, (), inputs).loss
            learner.meta_optimizer.zero_grad()
            meta_loss.backward()
            learner.meta_optimizer.step()
            learner.num_updates += 1
            with torch.no_grad():
                lr, state = scheduler.compute_lr(x)
            scheduler.apply_lr(lr, state)

        def after_step(self) -> None:
            pass

    class PaperStyleMLRSTrainer(MLRSTrainer):
        meta_step_class = PaperStyleMetaStep

    return PaperStyleMLRSTrainer
