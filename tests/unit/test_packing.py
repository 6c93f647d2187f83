"""Packing: best fit decreasing, and every document's loss exactly as unpacked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from tests.conftest import REPO
from tunefleet.launcher.config import DataConfig, DataSource
from tunefleet.launcher.data import batches, packing
from tunefleet.launcher.data.preprocess import encode_source
from tunefleet.launcher.model import attention
from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.model.tiny import ensure_tiny_model

TEXT = REPO / "recipes" / "tiny" / "data" / "text_reference.jsonl"


@pytest.fixture(scope="module")
def model_dir():
    return ensure_tiny_model("llama")


@pytest.fixture(scope="module")
def documents(model_dir):
    """The first 12 prose rows: every token after the first is a target."""
    source = DataSource(path=str(TEXT), format="text")
    split, _ = encode_source(source, DataConfig(sources=[source], max_seq_len=128),
                             transformers.AutoTokenizer.from_pretrained(model_dir))
    return split.take(range(12))


def test_best_fit_decreasing_fills_rows_without_splitting_any():
    lengths = np.asarray([5, 9, 3, 7, 2, 4, 8, 1])
    bins = packing.best_fit_decreasing(lengths, capacity=10)
    assert sorted(r for b in bins for r in b) == list(range(8))
    assert all(lengths[b].sum() <= 10 for b in bins) and len(bins) == 4  # 39 tokens need at least 4 rows


def test_packed_rows_hold_every_token_once_with_restarting_positions(documents):
    packed = packing.pack(documents, max_seq_len=128)
    assert len(packed) < len(documents) and packed.num_tokens == documents.num_tokens
    assert sorted(np.asarray(packed.input_ids).tolist()) == sorted(np.asarray(documents.input_ids).tolist())
    starts = np.flatnonzero(np.asarray(packed.position_ids) == 0)
    assert len(starts) == len(documents) and (np.asarray(packed.labels)[starts] == IGNORE_INDEX).all()
    assert packing.packing_efficiency(packed, 128) > packing.packing_efficiency(documents, 128)


def token_losses(model, batch, boundaries: bool) -> torch.Tensor:
    logits = attention.forward(model, batch, boundaries=boundaries).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


@pytest.mark.parametrize(("attn", "boundaries"), [
    ("sdpa", False),  # transformers' block-diagonal mask
    ("eager", False),
    (attention.NAME, False),  # tunefleet's implementation, given no boundaries: the same mask
    (attention.NAME, True),  # document boundaries, no mask: SDPA per document here, the flash kernel on CUDA
])
def test_every_document_has_the_same_token_losses_packed_and_unpacked(model_dir, documents, attn, boundaries):
    attention.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn).eval()
    packed = packing.pack(documents, max_seq_len=128)
    with torch.no_grad():
        unpacked_losses = token_losses(model, batches.collate(documents, range(len(documents)), pad_id=0), boundaries)
        packed_losses = token_losses(model, batches.collate(packed, range(len(packed)), pad_id=0), boundaries)
    offsets = np.asarray(documents.offsets)
    expected = {tuple(np.asarray(documents.input_ids[offsets[d]:offsets[d + 1]]).tolist()):
                unpacked_losses[d, : offsets[d + 1] - offsets[d] - 1] for d in range(len(documents))}
    found = 0
    for row in range(len(packed)):
        start, end = packed.offsets[row], packed.offsets[row + 1]
        positions = np.asarray(packed.position_ids[start:end])
        for doc_start, doc_end in zip(*_runs(positions), strict=True):
            tokens = tuple(np.asarray(packed.input_ids[start + doc_start:start + doc_end]).tolist())
            got = packed_losses[row, doc_start : doc_end - 1]
            torch.testing.assert_close(got, expected[tokens], rtol=1e-5, atol=1e-6)
            found += 1
    assert found == len(documents)
    assert packed_losses.sum() == pytest.approx(float(unpacked_losses.sum()), rel=1e-5)


def _runs(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.flatnonzero(positions == 0)
    return starts, np.append(starts[1:], len(positions))
