"""Tiny models, datasets and arguments for the tests: built in-process, nothing from the Hub."""

import torch


VOCAB, SEQ = 64, 8


def tiny_bert(num_labels: int = 3, seed: int = 0, dropout: float = 0.0, dtype=torch.float32):
    """A 2-layer BERT classifier with hidden size 32: about 40k parameters, a few ms per step."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, num_labels=num_labels, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config).to(dtype)


def tiny_dataset(n: int = 256, num_labels: int = 3, seed: int = 0):
    """Token sequences whose label is the second token (one of 9) mod num_labels: generalises in a few dozen steps."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    ids[:, 1] = torch.randint(1, 10, (n,), generator=g)
    return Dataset.from_dict({
        "input_ids": ids.tolist(),
        "attention_mask": [[1] * SEQ] * n,
        "label": (ids[:, 1] % num_labels).tolist(),
    })


def tiny_args(output_dir, **overrides):
    from hf_mlrs import MLRSTrainingArguments

    defaults = dict(
        per_device_train_batch_size=16, max_steps=20, learning_rate=1e-3, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, mlrs_meta_interval=2,
    )
    defaults.update(overrides)
    return MLRSTrainingArguments(str(output_dir), **defaults)



def constant_stages(*biases):
    """An MLRSNet whose stage k outputs about sigmoid(biases[k]) whatever the loss: stages made visible."""
    from hf_mlrs import MLRSNet

    torch.manual_seed(0)
    net = MLRSNet(stage_starts=[k / len(biases) for k in range(len(biases))])
    with torch.no_grad():
        for stage, bias in zip(net.stages, biases):
            stage.head.weight.zero_()
            stage.head.bias.fill_(bias)
    return net


def raise_at(step: int):
    """A TrainerCallback that raises after optimizer step `step`: a crash in train(), minus the process exit."""
    from transformers import TrainerCallback

    class RaiseAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError("simulated crash")

    return RaiseAt()
