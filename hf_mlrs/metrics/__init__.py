"""Metric modules shipped with hf_mlrs, so `evaluate.load` works offline (Hub metric scripts need a network)."""

from pathlib import Path


ACCURACY = str(Path(__file__).with_name("accuracy.py"))


def accuracy_metric():
    """A `compute_metrics` for Trainer: accuracy of the argmax of the logits, through `evaluate`."""
    import evaluate
    import numpy as np

    metric = evaluate.load(ACCURACY)

    def compute(prediction):
        return metric.compute(predictions=np.argmax(prediction.predictions, -1), references=prediction.label_ids)

    return compute
