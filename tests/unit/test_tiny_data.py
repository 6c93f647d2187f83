"""The shipped capitals task (tunefleet.launcher.data.tiny_data): held-out phrasings, and
references that the generation eval reads back exactly, so exact match can reach 1."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import REPO
from tunefleet.launcher.config import load_recipe
from tunefleet.launcher.data import preprocess, tiny_data
from tunefleet.launcher.evaluation import generation
from tunefleet.launcher.model import tiny

CAPITALS = REPO / "recipes" / "tiny" / "llama-capitals-ddp.yaml"


def _rows(split: str) -> list[dict]:
    path = REPO / "recipes" / "tiny" / "data" / "capitals" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_asks_every_country_in_a_phrasing_no_train_row_uses():
    train, held_out = _rows("train"), _rows("eval")
    table = dict(tiny.CAPITALS)
    assert len(train) == 4 * len(table) and len(held_out) == len(table)
    assert {r["output"] for r in train} == {r["output"] for r in held_out} == set(table.values())
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}
    phrasing = {r["instruction"].replace(country, "{country}")
                for r in held_out for country in table if country in r["instruction"]}
    assert len(phrasing) == 1 and not phrasing & {r["instruction"].replace(country, "{country}")
                                                  for r in train for country in table if country in r["instruction"]}


def test_rows_depend_only_on_the_seed():
    questions = ("What is the capital of {country}?",)
    assert tiny_data.capital_rows(questions, random.Random(0)) == tiny_data.capital_rows(questions, random.Random(0))
    assert tiny_data.capital_rows(questions, random.Random(0)) != tiny_data.capital_rows(questions, random.Random(1))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(tiny.tokenizer_corpus())


def test_the_generation_references_are_the_answers_in_a_few_tokens(tokenizer):
    recipe = load_recipe(CAPITALS)
    splits, _ = preprocess.build_splits(recipe.data, tokenizer, seed=recipe.train.seed)
    prompts = generation.rank_prompts(splits["eval"], tokenizer, max_prompts=recipe.data.eval.generate.max_prompts,
                                      rank=0, world_size=1)
    assert [p.reference for p in prompts] == [r["output"] for r in _rows("eval")]  # every eval row is decoded
    # The answer and its end-of-text token fit in the decoding budget, so a right answer stops by itself.
    longest = max(len(tokenizer.encode(p.reference)) for p in prompts)
    assert longest + 1 <= recipe.data.eval.generate.max_new_tokens
