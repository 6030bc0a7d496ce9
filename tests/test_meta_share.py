"""The held-out meta share rejoins training once no meta step is left in the run (MetaShareSampler)."""

import torch
from transformers import TrainerCallback

from hf_mlrs import MLRSTrainer
from hf_mlrs.data import MetaShareSampler, split_meta_indices
from tests.test_scale import LeastSquares, gammas, learned_args


def epochs(sampler, first, last):
    out = []
    for epoch in range(first, last):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_sampler_draws_the_training_part_until_released_then_the_whole_dataset_from_the_next_epoch():
    train, n = [i for i in range(50) if i % 10], 50  # 45 training examples, 5 held out
    sampler = MetaShareSampler(train, n, seed=3)
    before = epochs(sampler, 0, 2)
    assert all(sorted(e) == train for e in before) and before[0] != before[1]  # permutations, reshuffled
    sampler.set_epoch(1)
    sampler.release()  # during epoch 1: its order is already drawn
    assert sampler.released_from == 2
    assert epochs(sampler, 1, 2) == before[1:]
    after = epochs(sampler, 2, 8)
    assert all(len(e) == len(train) == len(set(e)) for e in after)  # same length per epoch, no repeats
    assert all(set(e) <= set(range(n)) for e in after)
    assert set().union(*after) - set(train)  # the held-out examples are trained on

    twin = MetaShareSampler(train, n, seed=3)  # same seed and state: the same batches (resume, every rank)
    twin.load_state_dict(sampler.state_dict())
    assert epochs(twin, 2, 8) == after and epochs(twin, 0, 2) == before
    assert epochs(MetaShareSampler(train, n, seed=4), 0, 1) != before[:1]


class Recording(MLRSTrainer):
    """Records, per optimizer step, the examples its training batches held (x[0] identifies an example)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", [])
        self.seen.append((self.state.global_step, inputs["x"][:, 0].tolist()))
        return super().training_step(model, inputs, num_items_in_batch)


def held_out_run(output_dir, **overrides):
    """Least squares, SGD, a learned scale that grows from 0.1 and holds once the one-step signal turns; 72 of 80
    examples train, 8 are held out; 5 steps per epoch, 8 epochs."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 8, generator=g)
    data = Dataset.from_dict({"x": x.tolist(), "labels": (x @ torch.randn(8, generator=g)).tolist()})
    args = learned_args(output_dir, learning_rate=0.1, optim="sgd", per_device_train_batch_size=16, max_steps=40,
                        max_grad_norm=0.0, mlrs_scale_growth=0.1, mlrs_settle_interval=1, mlrs_meta_interval=1,
                        mlrs_meta_lr=1e-2, mlrs_scale_hold=True, mlrs_meta_fraction=0.1, mlrs_meta_batch_size=8,
                        **overrides)
    trainer = Recording(model=LeastSquares(), args=args, train_dataset=data)
    _, meta = split_meta_indices(data, 0.1, args.seed)
    return trainer, {round(x[i, 0].item(), 5) for i in meta}


def test_held_out_share_rejoins_training_from_the_epoch_after_the_scale_holds(tmp_path):
    trainer, meta_ids = held_out_run(tmp_path)
    trainer.train()
    values, share = gammas(trainer), trainer._meta_share
    stop = next(k for k in range(1, len(values)) if values[k] == values[-1])  # the scale holds from here on
    assert 3 <= stop < 25 and share.released_from is not None
    assert share.released_from == stop // 5 + 1  # the epoch after the one in which the last meta step was taken
    for step, ids in trainer.seen:
        trained_meta = {round(v, 5) for v in ids} & meta_ids
        if step < 5 * share.released_from:
            assert not trained_meta, f"step {step} trained on held-out examples before the release"
    assert any({round(v, 5) for v in ids} & meta_ids for _, ids in trainer.seen)
    assert sum(len(ids) for _, ids in trainer.seen) == 8 * 72  # every epoch is as long as the training part
    # the Trainer's "Num examples" and samples per second count an epoch's examples, not the whole split's 80
    assert trainer.num_examples(trainer.get_train_dataloader()) == 72


class ReleaseAtStart(TrainerCallback):
    """The share's release epoch as a run starts (after its scheduler is made and any checkpoint loaded)."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen.append(self.trainer._meta_share.released_from)


def test_a_second_train_holds_the_share_out_again_until_its_own_release(tmp_path):
    trainer, meta_ids = held_out_run(tmp_path)
    probe = ReleaseAtStart(trainer)
    trainer.add_callback(probe)
    trainer.train()
    first = trainer._meta_share.released_from
    trainer.seen = []
    trainer.train()  # a new run: a new scale, which grows and holds again before the share is released
    assert probe.seen == [None, None] and first is not None  # not the first run's release
    early = [ids for step, ids in trainer.seen if step < 5 * trainer._meta_share.released_from]
    assert early and not any({round(v, 5) for v in ids} & meta_ids for ids in early)


def test_release_can_be_turned_off_and_needs_a_share_held_out_by_the_trainer(tmp_path):
    off, meta_ids = held_out_run(tmp_path / "off", mlrs_release_meta_share=False)
    off.train()
    assert off._meta_share is None
    assert not any({round(v, 5) for v in ids} & meta_ids for _, ids in off.seen)


def test_resume_before_and_after_the_release_is_bitwise_exact(tmp_path):
    full, _ = held_out_run(tmp_path / "full", save_strategy="steps", save_steps=5)
    full.train()
    released_from = full._meta_share.released_from
    expected = [p.detach().clone() for p in full.model.parameters()]
    for step in (5, 5 * (released_from + 1)):  # a checkpoint before the release was decided, one after
        resumed, _ = held_out_run(tmp_path / f"resumed{step}", save_strategy="steps", save_steps=5)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{step}"))
        assert resumed._meta_share.released_from == released_from
        assert gammas(resumed)[-1] == gammas(full)[-1]
        assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), expected)), step
