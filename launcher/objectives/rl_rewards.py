"""Rewards for online RL: the built-in checks, user functions named ``package.module:function``, and
their weighted sum.

A reward function scores one completion: ``fn(prompt, completion, row, **options) -> float``, where
``row`` is the dataset row the prompt came from (its reference answer, ids, anything the checker
needs). A ``Reward`` scores a batch; ``FunctionReward`` adapts a function to it, and a reward-model
scorer (a later step) implements the same protocol, so ``WeightedRewards`` mixes both.

A user function's result must be a finite real number; ``True``/``False`` count as 1/0, as in Python,
so a checker may return a comparison. A raise, NaN, infinity or any other type stops training with a
one-line ``RewardError`` that names the reward and the row, and ``check_rewards`` runs every reward
once before training starts so that a typo costs seconds, not a cluster start.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from tunefleet.launcher.errors import UserError

RewardFunction = Callable[..., Any]  # (prompt: str, completion: str, row: Mapping, **options) -> float
# A number with optional sign, thousands separators ("1,000") and decimals ("1000.0", ".5"); not glued to
# a word before it, so the "-4" of "3-4" and the "2" of "x2" are no numbers.
NUMBER = re.compile(r"(?<!\w)(?:[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|[-+]?\.\d+)")


class RewardError(UserError):
    """A reward that cannot be loaded, or that failed or returned a non-number on a row."""


# --------------------------------------------------------------------------- built-in rewards
def normalize_text(text: str) -> str:
    """Case-folded, with every run of whitespace made one space and the ends stripped."""
    return " ".join(text.split()).casefold()


def reference(row: Mapping[str, Any], field_name: str) -> str:
    """The row's reference answer as text; a ``RewardError`` when the field is missing or empty."""
    if field_name not in row:
        raise RewardError(f"the row has no field {field_name!r} (it has {sorted(row)}): "
                          f"set the reward's `field` option or add the field to the data")
    text = str(row[field_name]).strip()
    if not text:
        raise RewardError(f"the row's field {field_name!r} is empty: every row needs a reference answer")
    return text


def exact_match(prompt: str, completion: str, row: Mapping[str, Any], *, field: str = "answer") -> float:
    """1.0 when the completion equals the reference up to case and whitespace, else 0.0."""
    return float(normalize_text(completion) == normalize_text(reference(row, field)))


def contains(prompt: str, completion: str, row: Mapping[str, Any], *, field: str = "answer") -> float:
    """1.0 when the reference appears in the completion, up to case and whitespace, else 0.0."""
    return float(normalize_text(reference(row, field)) in normalize_text(completion))


def last_number(text: str) -> float | None:
    """The last number written in ``text`` ("1,000" and "1000.0" read 1000), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_match(prompt: str, completion: str, row: Mapping[str, Any], *, field: str = "answer") -> float:
    """1.0 when the last number of the completion equals the reference's number, else 0.0.

    The reference is the field's number, or the last number of its text (a GSM8K solution ending in
    "#### 72" reads 72). Equal means within a relative 1e-9, so "0.1" matches 0.1 however it was computed.
    """
    value = row.get(field)
    expected = float(value) if isinstance(value, numbers.Real) else last_number(reference(row, field))
    if expected is None:
        raise RewardError(f"the row's field {field!r} holds no number ({row[field]!r}): numeric_match needs one")
    answer = last_number(completion)
    return float(answer is not None and math.isclose(answer, expected, rel_tol=1e-9, abs_tol=1e-12))


def length_penalty(prompt: str, completion: str, row: Mapping[str, Any], *, target_chars: int) -> float:
    """``-max(0, len(completion) - target_chars) / target_chars``: 0 up to the target, then -1 for every
    further ``target_chars`` characters (target 200: 300 characters score -0.5).

    Characters, not tokens: a reward sees text only (about 4 characters per English token).
    """
    if target_chars < 1:
        raise RewardError(f"length_penalty needs target_chars >= 1, got {target_chars}")
    return -max(0, len(completion) - target_chars) / target_chars


BUILTINS: dict[str, RewardFunction] = {
    "exact_match": exact_match, "contains": contains, "numeric_match": numeric_match,
    "length_penalty": length_penalty,
}


# --------------------------------------------------------------------------- the batch interface
class Reward(Protocol):
    """Scores a batch: one float per completion. A reward-model scorer implements this too."""

    name: str

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 rows: Sequence[Mapping[str, Any]]) -> list[float]: ...


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def row_label(index: int, row: Mapping[str, Any]) -> str:
    """"row 3" or "row 3 (id 'q-17')": the index in the batch, and the row's own id when it has one."""
    return f"row {index} (id {row['id']!r})" if "id" in row else f"row {index}"


def checked_score(name: str, value: object, index: int, row: Mapping[str, Any]) -> float:
    """``value`` as a float, or a ``RewardError`` when it is not a finite real number."""
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RewardError(f"reward {name!r} returned {one_line(repr(value))[:80]} ({type(value).__name__}) "
                          f"on {row_label(index, row)}: return a finite float")
    return float(value)


@dataclass(frozen=True)
class FunctionReward:
    """A per-completion function as a ``Reward``; its errors name the reward and the row."""

    name: str
    function: RewardFunction
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def score_one(self, index: int, prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        try:
            value = self.function(prompt, completion, row, **self.options)
        except UserError as err:
            raise RewardError(f"reward {self.name!r} on {row_label(index, row)}: {one_line(err)}") from err
        except Exception as err:
            raise RewardError(f"reward {self.name!r} raised {type(err).__name__}: {one_line(err)} on "
                              f"{row_label(index, row)}: fix the function or that row") from err
        return checked_score(self.name, value, index, row)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 rows: Sequence[Mapping[str, Any]]) -> list[float]:
        return [self.score_one(index, prompt, completion, row)
                for index, (prompt, completion, row) in enumerate(zip(prompts, completions, rows, strict=True))]


# --------------------------------------------------------------------------- loading
def import_function(spec: str) -> RewardFunction:
    """The callable named by ``package.module:function``; a one-line ``RewardError`` saying what to fix."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise RewardError(f"reward {spec!r}: write a built-in ({', '.join(BUILTINS)}) or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise RewardError(f"reward {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: "
                          f"{one_line(err)}): make it importable on every worker (PYTHONPATH) or fix the name") from err
    function = getattr(module, attribute, None)
    if function is None:
        raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attribute!r}: "
                          f"fix the function name after ':'")
    if not callable(function):
        raise RewardError(f"reward {spec!r}: {attribute!r} is a {type(function).__name__}, not a function "
                          f"(prompt, completion, row) -> float")
    return function


def check_signature(spec: str, function: RewardFunction, options: Mapping[str, Any]) -> None:
    """A ``RewardError`` unless ``function(prompt, completion, row, **options)`` binds."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # some C callables have no signature; the preflight call checks them instead
    try:
        signature.bind("", "", {}, **options)
    except TypeError as err:
        raise RewardError(f"reward {spec!r} cannot be called as (prompt, completion, row"
                          f"{''.join(f', {key}=...' for key in options)}): {err}") from err


def load_reward(spec: str, options: Mapping[str, Any] | None = None, *, name: str | None = None) -> FunctionReward:
    """A built-in by name, or the user function ``package.module:function``, with ``options`` passed as
    keyword arguments on every call; ``name`` (default: ``spec``) keys its metrics."""
    options = dict(options or {})
    function = BUILTINS.get(spec) or import_function(spec)
    check_signature(spec, function, options)
    return FunctionReward(name=name or spec, function=function, options=options)


# --------------------------------------------------------------------------- reward models
MODEL_REWARD_NAME = "reward_model"


def reward_model_problem(path: str) -> str | None:
    """Why the folder at ``path`` is not a reward model (``method.objective: reward``'s export), or None.
    Reads its config only, so the driver can check it without loading weights."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        return f"{path} holds no model (no config.json); point it at the final/ folder of a reward-model run"
    settings = json.loads(config.read_text())
    architectures = settings.get("architectures") or []
    num_labels = len(settings.get("id2label") or {}) or settings.get("num_labels")
    if not any(name.endswith("ForSequenceClassification") for name in architectures) or num_labels != 1:
        return (f"{path} is not a reward model (architectures {architectures}, {num_labels} labels); train one with "
                "method.objective: reward (model.task sequence_classification, model.num_labels 1)")
    return None


class ModelReward:
    """The score a reward model (a folder trained with ``method.objective: reward``) gives each prompt +
    completion, tokenized as that training tokenized its rows: beginning of text, the prompt, then the
    completion with the end of text."""

    def __init__(self, path: str, *, device, name: str = MODEL_REWARD_NAME, batch_size: int = 16):
        import torch
        import transformers

        self.name, self.device, self.batch_size = name, device, batch_size
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path)
        self.model = model.to(device).eval().requires_grad_(False)
        self.torch = torch

    def encode(self, prompt: str, completion: str) -> list[int]:
        tokenizer = self.tokenizer
        head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        pieces = tokenizer([prompt, completion + (tokenizer.eos_token or "")], add_special_tokens=False)["input_ids"]
        return head + pieces[0] + pieces[1]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 rows: Sequence[Mapping[str, Any]]) -> list[float]:
        torch, pad = self.torch, self.tokenizer.pad_token_id
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start:start + self.batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for i, ids in enumerate(chunk):
                    input_ids[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), 1
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
                scores += logits[:, 0].float().tolist()
        return [checked_score(self.name, value, index, row)
                for index, (value, row) in enumerate(zip(scores, rows, strict=True))]


# --------------------------------------------------------------------------- weighted sums
@dataclass(frozen=True)
class RewardSpec:
    """One reward of a recipe: what to load, its weight in the total, its options and display name.
    ``model`` (a reward-model folder) replaces ``function``."""

    function: str | None = None  # a built-in name or "package.module:function"
    weight: float = 1.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None
    model: str | None = None


class RewardScores(NamedTuple):
    total: list[float]  # per completion: the weighted sum
    per_reward: dict[str, list[float]]  # per reward name: its unweighted scores, for metrics


@dataclass(frozen=True)
class WeightedRewards:
    """Several rewards and their weights; ``score`` gives the weighted total and every reward's scores."""

    rewards: tuple[Reward, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        names = [reward.name for reward in self.rewards]
        if not names:
            raise RewardError("online RL needs at least one reward")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise RewardError(f"rewards need distinct names, {repeated} appear twice: give one of them a `name`")
        if len(self.weights) != len(self.rewards) or not all(math.isfinite(w) for w in self.weights):
            raise RewardError(f"need one finite weight per reward, got {list(self.weights)} for {names}")

    @classmethod
    def from_specs(cls, specs: Sequence[RewardSpec | str], *, device=None) -> WeightedRewards:
        """Load every reward; reward models go to ``device`` (default: CPU)."""
        specs = [RewardSpec(spec) if isinstance(spec, str) else spec for spec in specs]
        rewards = tuple(
            ModelReward(spec.model, device=device or "cpu", name=spec.name or MODEL_REWARD_NAME) if spec.model
            else load_reward(spec.function, spec.options, name=spec.name) for spec in specs
        )
        return cls(rewards=rewards, weights=tuple(spec.weight for spec in specs))

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              rows: Sequence[Mapping[str, Any]]) -> RewardScores:
        per_reward = {reward.name: reward(prompts, completions, rows) for reward in self.rewards}
        assert all(len(scores) == len(completions) for scores in per_reward.values()), "one score per completion"
        weighted = [[weight * score for score in per_reward[reward.name]]
                    for reward, weight in zip(self.rewards, self.weights, strict=True)]
        total = [sum(scores) for scores in zip(*weighted, strict=True)]
        return RewardScores(total=total, per_reward=per_reward)


def check_rewards(specs: Sequence[RewardSpec | str], sample_row: Mapping[str, Any], *, prompt: str = "") -> None:
    """Preflight: load every reward and score an empty completion of ``sample_row`` once, so a reward
    that cannot be imported, called or returns a non-number fails before any training starts."""
    specs = [RewardSpec(spec) if isinstance(spec, str) else spec for spec in specs]
    for spec in specs:
        if spec.model and (problem := reward_model_problem(spec.model)):
            raise RewardError(f"reward model {problem}")
    functions = [spec for spec in specs if not spec.model]  # a model's weights load on the workers only
    if functions:
        WeightedRewards.from_specs(functions).score([prompt], [""], [sample_row])
