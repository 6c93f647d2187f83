"""Evaluation figures on known numbers, in one process (no process group)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.objectives.sft import evaluate_classifier


class FixedLogits(torch.nn.Module):
    """A classifier whose logits are given per row, in eval-batch order."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.row = logits, 0

    def forward(self, input_ids, **_):
        rows = self.logits[self.row:self.row + len(input_ids)]
        self.row += len(input_ids)
        return SimpleNamespace(logits=rows)


def test_classifier_accuracy_and_macro_f1_on_known_predictions():
    predicted, labels = [0, 1, 1, 1, 2], [0, 1, 2, 1, IGNORE_INDEX]  # the last row is padding
    logits = torch.nn.functional.one_hot(torch.tensor(predicted), 3).float() * 4
    batches = [{"input_ids": torch.zeros(len(chunk), 4, dtype=torch.long),
                "attention_mask": torch.ones(len(chunk), 4, dtype=torch.long),
                "labels": torch.tensor(chunk)} for chunk in (labels[:2], labels[2:])]
    strategy = SimpleNamespace(model=FixedLogits(logits))
    result = evaluate_classifier(strategy, batches, torch.device("cpu"), num_labels=3)
    # Class 0: F1 1; class 1: 2 of 3 predictions right, both found, F1 0.8; class 2: never predicted, F1 0.
    assert result["eval_accuracy"] == pytest.approx(0.75)
    assert result["eval_f1"] == pytest.approx((1 + 0.8 + 0) / 3)
    expected_loss = torch.nn.functional.cross_entropy(logits[:4], torch.tensor(labels[:4]))
    assert result["eval_loss"] == pytest.approx(float(expected_loss))
