"""Rewards for online RL: every built-in on several strings, user functions named
``package.module:function`` (a module written to tmp_path), the one-line errors they raise, the
weighted sum with per-reward scores, and the preflight."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from tunefleet.launcher.errors import UserError
from tunefleet.launcher.objectives.rl_rewards import (
    RewardError,
    RewardSpec,
    WeightedRewards,
    check_rewards,
    contains,
    exact_match,
    last_number,
    length_penalty,
    load_reward,
    numeric_match,
)

USER_MODULE = "tf_user_rewards"
USER_CODE = '''
import math

NOT_A_FUNCTION = 3

def length(prompt, completion, row):
    return len(completion)

def is_answer(prompt, completion, row):
    return completion == row["answer"]

def with_bonus(prompt, completion, row, *, bonus):
    return bonus

def raising(prompt, completion, row):
    raise ValueError("boom\\non two lines")

def text(prompt, completion, row):
    return "1.0"

def not_a_number(prompt, completion, row):
    return math.nan

def infinite(prompt, completion, row):
    return -math.inf
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


def user_error(call) -> str:
    """The message of the ``RewardError`` that ``call()`` raises, checked to be one line with exit code 2."""
    with pytest.raises(RewardError) as caught:
        call()
    assert isinstance(caught.value, UserError) and caught.value.exit_code == 2
    message = str(caught.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- built-ins
@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("  Paris \n", "paris", 1.0),
    ("New   York", "new york", 1.0),
    ("Paris.", "Paris", 0.0),
    ("", "Paris", 0.0),
    ("PARIS", " Paris ", 1.0),
])
def test_exact_match(completion, answer, expected):
    assert exact_match("q", completion, {"answer": answer}) == expected


def test_exact_match_reads_the_named_field():
    assert exact_match("q", "Lyon", {"answer": "Paris", "city": "lyon"}, field="city") == 1.0


@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("The capital is Paris.", "paris", 1.0),
    ("It is Lyon", "paris", 0.0),
    ("the answer:\n new\tyork!", "New York", 1.0),
    ("", "x", 0.0),
])
def test_contains(completion, answer, expected):
    assert contains("q", completion, {"answer": answer}) == expected


@pytest.mark.parametrize(("completion", "answer", "expected"), [
    ("so the total is 1,000", "1000", 1.0),
    ("1000.0", 1000, 1.0),
    ("It drops by -3", "-3", 1.0),
    ("It drops by 3", "-3", 0.0),
    ("first 5, then 7", "5", 0.0),
    ("first 7, finally 5.", 5.0, 1.0),
    ("half is .5", "0.5", 1.0),
    ("pages 3-4", "4", 1.0),
    ("no number here", "1", 0.0),
    ("", "1", 0.0),
    ("72", "He has 3 + 69 = 72 apples.\n#### 72", 1.0),
    ("$1,234,567.25", "1234567.25", 1.0),
])
def test_numeric_match(completion, answer, expected):
    assert numeric_match("q", completion, {"answer": answer}) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("1,000", 1000.0), ("1000.0", 1000.0), ("-3", -3.0), ("+3", 3.0), ("x2", None), ("12,34", 34.0), ("", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize(("completion", "expected"), [("", 0.0), ("a" * 10, 0.0), ("a" * 15, -0.5), ("a" * 30, -2.0)])
def test_length_penalty_grows_beyond_the_target(completion, expected):
    assert length_penalty("q", completion, {}, target_chars=10) == expected


def test_builtin_reference_problems_name_the_field():
    reward = load_reward("exact_match")
    assert user_error(lambda: reward(["q"], ["x"], [{"question": "q", "id": 7}])) == (
        "reward 'exact_match' on row 0 (id 7): the row has no field 'answer' (it has ['id', 'question']): "
        "set the reward's `field` option or add the field to the data")
    numeric = load_reward("numeric_match")
    assert user_error(lambda: numeric(["q"], ["1"], [{"answer": "none"}])) == (
        "reward 'numeric_match' on row 0: the row's field 'answer' holds no number ('none'): "
        "numeric_match needs one")
    assert "is empty" in user_error(lambda: load_reward("contains")(["q"], ["x"], [{"answer": " "}]))


def test_builtin_options_are_checked_when_loading():
    assert user_error(lambda: load_reward("length_penalty")) == (
        "reward 'length_penalty' cannot be called as (prompt, completion, row): "
        "missing a required argument: 'target_chars'")
    assert "unexpected keyword argument 'colour'" in user_error(lambda: load_reward("exact_match", {"colour": 1}))
    assert load_reward("length_penalty", {"target_chars": 4})(["q"], ["abcdef"], [{}]) == [-0.5]


# --------------------------------------------------------------------------- user functions
def test_user_function_scores_a_batch(user_module):
    reward = load_reward(f"{user_module}:length")
    assert reward.name == "tf_user_rewards:length"
    assert reward(["p", "p"], ["abc", ""], [{}, {}]) == [3.0, 0.0]
    assert load_reward(f"{user_module}:is_answer")(["p", "p"], ["4", "5"], [{"answer": "4"}] * 2) == [1.0, 0.0]
    assert load_reward(f"{user_module}:with_bonus", {"bonus": 2.5})(["p"], ["c"], [{}]) == [2.5]


def test_missing_module():
    assert user_error(lambda: load_reward("nope_rewards_xyz.scoring:score")) == (
        "reward 'nope_rewards_xyz.scoring:score': cannot import module 'nope_rewards_xyz.scoring' "
        "(ModuleNotFoundError: No module named 'nope_rewards_xyz'): make it importable on every worker "
        "(PYTHONPATH) or fix the name")


def test_missing_and_uncallable_attributes(user_module):
    assert user_error(lambda: load_reward(f"{user_module}:lenght")) == (
        "reward 'tf_user_rewards:lenght': module 'tf_user_rewards' has no attribute 'lenght': "
        "fix the function name after ':'")
    assert user_error(lambda: load_reward(f"{user_module}:NOT_A_FUNCTION")) == (
        "reward 'tf_user_rewards:NOT_A_FUNCTION': 'NOT_A_FUNCTION' is a int, not a function "
        "(prompt, completion, row) -> float")
    assert "cannot be called as (prompt, completion, row)" in user_error(
        lambda: load_reward(f"{user_module}:with_bonus"))


@pytest.mark.parametrize("spec", ["no_such_builtin", "a:b:c", ":score", "module:"])
def test_malformed_specs(spec):
    assert user_error(lambda: load_reward(spec)) == (
        f"reward {spec!r}: write a built-in (exact_match, contains, numeric_match, length_penalty) "
        "or 'package.module:function'")


def test_raising_function_names_the_reward_and_row(user_module):
    reward = load_reward(f"{user_module}:raising")
    assert user_error(lambda: reward(["p", "p"], ["a", "b"], [{"id": "q-1"}, {"id": "q-2"}])) == (
        "reward 'tf_user_rewards:raising' raised ValueError: boom on two lines on row 0 (id 'q-1'): "
        "fix the function or that row")


@pytest.mark.parametrize(("function", "shown"), [
    ("text", "'1.0' (str)"), ("not_a_number", "nan (float)"), ("infinite", "-inf (float)"),
])
def test_non_numbers_are_rejected(user_module, function, shown):
    reward = load_reward(f"{user_module}:{function}")
    assert user_error(lambda: reward(["p", "p"], ["a", "b"], [{}, {"id": 12}])) == (
        f"reward 'tf_user_rewards:{function}' returned {shown} on row 0: return a finite float")


# --------------------------------------------------------------------------- weighted sums and the preflight
class FakeRewardModel:
    """What a reward-model scorer will implement: a name and a batch call."""

    name = "reward_model"

    def __call__(self, prompts, completions, rows):
        return [0.25 * len(completion) for completion in completions]


def test_weighted_total_and_per_reward_scores():
    rewards = WeightedRewards.from_specs([
        "exact_match", RewardSpec("length_penalty", weight=0.5, options={"target_chars": 5}, name="brevity"),
    ])
    scores = rewards.score(["q", "q"], ["Paris", "paris is big"], [{"answer": "paris"}] * 2)
    assert scores.per_reward == {"exact_match": [1.0, 0.0], "brevity": [0.0, -1.4]}
    assert scores.total == pytest.approx([1.0, -0.7])
    total, per_reward = scores  # also unpacks as (total, per_reward)
    assert total == scores.total and per_reward is scores.per_reward


def test_a_reward_model_mixes_with_functions():
    rewards = WeightedRewards(rewards=(load_reward("contains"), FakeRewardModel()), weights=(2.0, -1.0))
    scores = rewards.score(["q"], ["4 ok!!"], [{"answer": "4"}])
    assert scores.total == [2.0 * 1.0 - 1.0 * 1.5]
    assert scores.per_reward == {"contains": [1.0], "reward_model": [1.5]}


def test_weighted_rewards_need_distinct_names_and_finite_weights():
    assert user_error(lambda: WeightedRewards.from_specs(["exact_match", "exact_match"])) == (
        "rewards need distinct names, ['exact_match'] appear twice: give one of them a `name`")
    assert "one finite weight" in user_error(lambda: WeightedRewards.from_specs([RewardSpec("contains", math.nan)]))
    assert "at least one reward" in user_error(lambda: WeightedRewards.from_specs([]))


def test_check_rewards_passes_on_a_good_sample(user_module):
    assert check_rewards(["numeric_match", f"{user_module}:length"], {"answer": "#### 42"}, prompt="What?") is None
    rewards = WeightedRewards.from_specs(["numeric_match", f"{user_module}:length"])
    assert [reward.name for reward in rewards.rewards] == ["numeric_match", "tf_user_rewards:length"]
    assert rewards.weights == (1.0, 1.0)


def test_check_rewards_fails_before_training(user_module):
    assert user_error(lambda: check_rewards(["exact_match"], {"question": "q", "id": "a1"})).startswith(
        "reward 'exact_match' on row 0 (id 'a1'): the row has no field 'answer'")
    assert user_error(lambda: check_rewards([f"{user_module}:text"], {"answer": "1"})) == (
        "reward 'tf_user_rewards:text' returned '1.0' (str) on row 0: return a finite float")
    assert "cannot import module" in user_error(lambda: check_rewards(["missing_mod_q:f"], {"answer": "1"}))
