"""Macro-averaged F1 over the labels present, shipped with hf_attn_variants so it works offline."""

import datasets
import evaluate


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Macro F1: the unweighted mean of per-label F1 scores.",
            citation="",
            inputs_description="predictions and references: lists of integer labels",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        labels = sorted(set(references) | set(predictions))
        scores = []
        for label in labels:
            tp = sum(1 for p, r in zip(predictions, references, strict=True) if p == label and r == label)
            fp = sum(1 for p, r in zip(predictions, references, strict=True) if p == label and r != label)
            fn = sum(1 for p, r in zip(predictions, references, strict=True) if p != label and r == label)
            scores.append(2 * tp / max(2 * tp + fp + fn, 1))
        return {"f1": sum(scores) / max(len(scores), 1)}
