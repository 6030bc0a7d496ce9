"""Accuracy as an `evaluate` metric module kept beside the recipes, so `evaluate.load` works offline.

Load it with `evaluate.load(tasks.ACCURACY)` (see `tasks.accuracy_metric`); Hub metric scripts cannot be fetched
without a network.
"""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the reference label.",
            citation="",
            inputs_description="predictions: list of int; references: list of int",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / max(len(references), 1)}
