"""What MLRSTrainer and MLRSCallback both need from a `transformers.Trainer`: the loss of each step, read right.

MLR-SNet reads the training loss of step t to set the lr of step t. Inside a Trainer that loss is the sum of the
`training_step` returns over one gradient-accumulation window (each is already divided by the number of
accumulation steps), averaged over processes: the same number the Trainer logs as `loss`.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch
from torch import nn


logger = logging.getLogger(__name__)


class StepLossMeter:
    """Sums the `training_step` returns of one accumulation window; `pop` gives the global mean and resets."""

    def __init__(self):
        self.total: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.total = loss if self.total is None else self.total + loss

    def pop(self, accelerator) -> float:
        total = self.total if self.total is not None else torch.tensor(float("nan"), device=accelerator.device)
        self.total = None
        if accelerator.num_processes > 1:
            # The schedule net's input must be identical on every rank, or ranks set different lrs and drift apart.
            total = accelerator.reduce(total.to(accelerator.device), reduction="mean")
        return float(total)


def model_scales_loss_itself(model: nn.Module) -> bool:
    """Whether the model's forward really uses `num_items_in_batch` (as causal-LM heads do).

    Trainer assumes it does whenever forward takes `**kwargs`. Models such as BertForSequenceClassification take
    `**kwargs` but return their own batch mean, and Trainer then scales loss and gradients by
    gradient_accumulation_steps x num_processes (an open upstream bug).
    """
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    return "loss_function" in source or "num_items_in_batch" in source


def fix_loss_scaling(trainer) -> None:
    """Make the Trainer divide by the accumulation steps itself when the model returns a plain batch mean."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "base_model", model) if hasattr(model, "peft_config") else model
    if trainer.model_accepts_loss_kwargs and not model_scales_loss_itself(model):
        logger.info(
            "hf_mlrs: %s returns a batch-mean loss; setting model_accepts_loss_kwargs=False so that the loss the "
            "schedule reads (and the gradients) are not multiplied by accumulation steps x processes.",
            type(model).__name__,
        )
        trainer.model_accepts_loss_kwargs = False


def num_labels_of(model: nn.Module) -> int | None:
    """C for the paper's gamma heuristic and for loss / ln(C): classes, or the vocabulary of a language model."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if getattr(config, "problem_type", None) != "regression" and getattr(config, "num_labels", 0) >= 2:
        if not getattr(config, "is_decoder", False) and "CausalLM" not in type(model).__name__:
            return int(config.num_labels)
    vocab = getattr(config, "vocab_size", None)
    return int(vocab) if vocab else None


def check_all_processes_joined(trainer) -> None:
    """Refuse a launch whose processes would train independently (e.g. `--multi_gpu` on a CPU without use_cpu).

    Each would set its own lrs and learn its own schedule from a different shard: silently wrong.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        launched = max(launched, torch.distributed.get_world_size())
    if launched > trainer.accelerator.num_processes:
        raise RuntimeError(
            f"hf_mlrs: {launched} processes were launched, but this Trainer runs as "
            f"{trainer.accelerator.num_processes} process(es): they would train independently. On CPUs set "
            "use_cpu=True (or ACCELERATE_USE_CPU=1) with a multi-process launch, e.g. "
            "recipes/accelerate_configs/cpu_2proc.yaml."
        )


def tap_method(trainer, name: str, wrap) -> None:
    """Replace `trainer.<name>`, on this instance only, by `wrap(original)`; a tap left by a failed train() goes first.

    For a `Trainer` that is not ours (MLRSCallback): a callback gets no other way into the loss or the save.
    """
    untap_method(trainer, name)
    original = getattr(trainer, name)
    tapped = wrap(original)
    tapped.mlrs_original = original
    setattr(trainer, name, tapped)


def untap_method(trainer, name: str) -> None:
    tap = vars(trainer).get(name) if trainer is not None else None
    if tap is not None and hasattr(tap, "mlrs_original"):
        original = tap.mlrs_original
        if getattr(original, "__func__", None) is getattr(type(trainer), name, None):
            delattr(trainer, name)  # back to the class's method
        else:
            setattr(trainer, name, original)  # someone else's wrapper, kept


def broadcast_from_main(module: nn.Module, accelerator) -> None:
    """Copy rank 0's parameters and buffers of a (CPU) module to every rank, through the training device."""
    if accelerator.num_processes <= 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        on_device = tensor.detach().to(accelerator.device)
        torch.distributed.broadcast(on_device, src=0)
        with torch.no_grad():
            tensor.copy_(on_device.to(tensor.device))
