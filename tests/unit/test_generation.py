"""Generation-based evaluation without a process group: matching, where a row's prompt
ends, equal shares of prompts per rank, and the recipe rules for `data.eval.generate`."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REPO
from tunefleet.launcher.config import load_recipe
from tunefleet.launcher.data.batches import TokenizedSplit
from tunefleet.launcher.errors import RecipeError
from tunefleet.launcher.evaluation import generation
from tunefleet.launcher.model.inputs import IGNORE_INDEX

FULL = REPO / "recipes" / "tiny" / "llama-full-ddp.yaml"
GENERATE = "data.eval.generate={max_prompts: 8, max_new_tokens: 4}"


def test_matching_strips_and_case_folds():
    generated = ["  TSEROF\n", "tserof and more", "Paris", "", "111"]
    references = ["tserof", "tserof", "paris ", "x", "11"]
    assert generation.match_counts(generated, references) == (2, 4)


def test_the_prompt_ends_where_the_last_response_starts():
    ids = np.arange(10, 20)
    labels = np.array([IGNORE_INDEX] * 3 + [13, 14] + [IGNORE_INDEX] * 2 + [17, 18, 19])  # two assistant turns
    assert generation.split_prompt(ids, labels) == (list(range(10, 17)), [17, 18, 19])
    assert generation.split_prompt(ids, np.full(10, IGNORE_INDEX)) is None
    assert generation.split_prompt(ids, ids) is None  # all targets (text rows): no prompt


class Tokens:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_every_rank_decodes_the_same_number_of_prompts():
    rows = [([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3]) for _ in range(5)]
    offsets = np.cumsum([0] + [len(ids) for ids, _ in rows])
    split = TokenizedSplit(np.concatenate([ids for ids, _ in rows]), np.concatenate([labs for _, labs in rows]),
                           offsets)
    shares = [generation.rank_prompts(split, Tokens(), max_prompts=5, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    assert sum(p.counted for s in shares for p in s) == 5 and shares[1][-1].counted is False
    assert shares[0][0] == generation.Prompt([1, 2], "3")


@pytest.mark.parametrize(("overrides", "message"), [
    ([f"data.sources=[{{path: {REPO}/recipes/tiny/data/text_reference.jsonl, format: text}}]"],
     "data.eval.generate: needs a causal language model on alpaca/chat/completion"),
    (["data.train_on_prompt=true"], "data.eval.generate: with data.train_on_prompt"),
    (["data.packing=true"], "data.eval.generate: packed eval rows"),
    (["data.eval.path=null", "data.eval.max_rows=null"], "data.eval.generate: runs with the evaluation"),
])
def test_generation_needs_prompts_with_references(overrides, message):
    assert load_recipe(FULL, [GENERATE]).data.eval.generate.max_new_tokens == 4
    with pytest.raises(RecipeError, match=message):
        load_recipe(FULL, [GENERATE, *overrides])


def test_reference_data_resolves_and_needs_a_language_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(FULL, ["data.eval.reference_data=recipes/tiny/data/text_reference.jsonl"])
    assert recipe.data.eval.reference_data == str(REPO / "recipes" / "tiny" / "data" / "text_reference.jsonl")
    classify = REPO / "recipes" / "tiny" / "llama-classify-ddp.yaml"
    with pytest.raises(RecipeError, match="data.eval.reference_data: perplexity needs a causal language model"):
        load_recipe(classify, ["data.eval.reference_data=recipes/tiny/data/text_reference.jsonl"])
