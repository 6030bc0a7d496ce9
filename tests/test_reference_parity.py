"""MLRSTrainer's in-place meta-update against the slow, paper-style reference (copy, virtual step, autograd)."""

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import default_data_collator

from hf_mlrs import MLRSNet, MLRSTrainer
from hf_mlrs.reference import reference_meta_train
from tests.testing_utils import tiny_args, tiny_bert, tiny_dataset


class SequentialMLRSTrainer(MLRSTrainer):
    """Reads the training data in order, so the reference can be fed the very same batches."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


OPTIMIZERS = {
    "sgd_momentum_wd": (lambda params: torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=5e-4), 0.3),
    "adamw": (lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01), 3e-3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trainer_meta_updates_match_the_reference(tmp_path, name):
    make_optimizer, gamma = OPTIMIZERS[name]
    steps, interval, batch = 12, 2, 16  # 6 meta-updates
    train, meta = tiny_dataset(n=steps * batch, seed=0), tiny_dataset(n=32, seed=1)
    fast_model, slow_model = tiny_bert(seed=0), tiny_bert(seed=0)

    trainer = SequentialMLRSTrainer(
        model=fast_model,
        args=tiny_args(tmp_path, max_steps=steps, learning_rate=gamma, mlrs_meta_interval=interval,
                       mlrs_meta_batch_size=len(meta), mlrs_meta_lr=1e-2),
        train_dataset=train,
        meta_dataset=meta,
        optimizers=(make_optimizer(fast_model.parameters()), None),
    )
    slow_net = MLRSNet(**{k: v for k, v in trainer.schedule.config().items() if k != "provenance"})
    slow_net.load_state_dict(trainer.schedule.state_dict())
    trainer.train()

    def loss_fn(module, inputs):
        return module(**inputs).loss

    def collate(ds):
        return {k: v for k, v in default_data_collator([ds[i] for i in range(len(ds))]).items()}

    train_batches = [collate(train.select(range(i * batch, (i + 1) * batch))) for i in range(steps)]
    meta_batch = collate(meta)
    result = reference_meta_train(
        slow_model, make_optimizer(slow_model.parameters()), slow_net, gamma=gamma,
        train_batches=train_batches, meta_batches=lambda m: meta_batch, loss_fn=loss_fn,
        interval=interval, meta_lr=1e-2, weight_decay=1e-4, max_grad_norm=trainer.args.max_grad_norm,
    )

    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert len(logged) == steps and len(result["meta_losses"]) == steps // interval
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(result["lrs"]), rtol=1e-4, atol=0)
    # The lr must actually have been learned, not left at its start, for the comparison to mean anything.
    assert abs(logged[-1] - logged[0]) > 1e-3 * gamma
    for (name_, fast), slow in zip(trainer.schedule.stages[-1].named_parameters(), slow_net.stages[-1].parameters()):
        torch.testing.assert_close(fast.detach(), slow.detach(), rtol=1e-4, atol=1e-6, msg=name_)
    for fast, slow in zip(fast_model.parameters(), slow_model.parameters()):
        torch.testing.assert_close(fast.detach(), slow.detach(), rtol=1e-4, atol=1e-5)
