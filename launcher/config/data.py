"""The `data` section: training sources and their row formats, the evaluation split, and the figures an
evaluation reports."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunefleet.launcher.config.base import LocalPath, Section
from tunefleet.launcher.config.method import ONLINE_RL

DataFormat = Literal["alpaca", "chat", "completion", "text", "classification", "preference", "prompt"]
# The field names each format reads; `data.sources[].fields` renames them per source.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected", "role", "content"),
    "prompt": ("prompt", "answer", "role", "content"),  # online RL: a prompt and its reference answer
}
CHAT_ROLES = ("system", "user", "assistant")
_HUB_ONLY = ("name", "split", "revision")


class DataSource(Section):
    path: LocalPath | None = Field(
        None, description="A local .jsonl, .json (a list of objects), .parquet or .csv file, or a folder: "
        "every such file in it, in name order."
    )
    dataset: str | None = Field(
        None, description="A Hugging Face dataset id (or local dataset folder) read with `datasets.load_dataset`, "
        "instead of `path`."
    )
    name: str | None = Field(None, description="Dataset configuration name (with `dataset`).")
    split: str = Field("train", description="Dataset split to read (with `dataset`).")
    revision: str | None = Field(None, description="Dataset revision to pin (with `dataset`).")
    format: DataFormat = Field(
        "alpaca", description="Row layout: alpaca (instruction/input/output), chat (messages), completion "
        "(prompt/completion), text, classification (text/label), preference (prompt/chosen/rejected)."
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="Rename the fields this format reads, e.g. "
        "`{messages: conversations, role: from, content: value}`."
    )
    roles: dict[str, str] = Field(
        default_factory=dict, description="Map this source's role names to system/user/assistant, "
        "e.g. `{human: user, gpt: assistant}`."
    )
    weight: float = Field(
        1.0, gt=0, description="Rows drawn from this source per epoch, as a multiple of its size: 2 repeats "
        "every row twice, 0.5 takes a seeded half (fixed when the data is prepared)."
    )

    @model_validator(mode="after")
    def _check(self) -> DataSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("set exactly one of path (local files) and dataset (a Hugging Face dataset id)")
        defaults = type(self).model_fields
        given = {n for n in set(_HUB_ONLY) & self.model_fields_set if getattr(self, n) != defaults[n].default}
        if self.path is not None and (stray := sorted(given)):
            raise ValueError(f"{', '.join(stray)}: only used by `dataset` sources; remove")
        unknown = sorted(set(self.fields) - set(FORMAT_FIELDS[self.format]))
        if unknown:
            raise ValueError(f"fields: {', '.join(unknown)} not read by format {self.format}; "
                             f"it reads {', '.join(FORMAT_FIELDS[self.format])}")
        if bad := sorted(role for role in self.roles.values() if role not in CHAT_ROLES):
            raise ValueError(f"roles: {', '.join(bad)} is not one of {', '.join(CHAT_ROLES)}")
        return self

    @property
    def display_name(self) -> str:
        """How errors and reports name this source."""
        return self.path or f"{self.dataset}[{self.split}]"


class GenerateEval(Section):
    """Generation-based evaluation: a held-out alpaca/completion/chat row's prompt is everything before its
    (last) response, the reference is that response; matching strips and case-folds both texts."""

    max_prompts: int = Field(
        64, ge=1, description="Decode from at most this many eval prompts (the first ones of the eval split)."
    )
    max_new_tokens: int = Field(32, ge=1, description="Tokens decoded per prompt (fewer when every row ended).")


class EvalSplit(Section):
    path: LocalPath | None = Field(
        None, description="A held-out file or folder, read like the first source (format, fields, roles)."
    )
    fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of every source's rows (seeded) instead of a file."
    )
    max_rows: int | None = Field(
        None, ge=1, description="Evaluate on at most this many rows (pairs for DPO, packed rows with packing)."
    )
    generate: GenerateEval | None = Field(
        None, description="Also decode greedily from held-out prompts and compare with their references "
        "(eval_exact_match, eval_contains_match) at every evaluation; none skips generation."
    )
    reference_data: LocalPath | None = Field(
        None, description="Forgetting watch: a general-domain `text` file (or folder) whose perplexity is "
        "measured before training and at every evaluation (reference_perplexity, and "
        "reference_perplexity_change: minus the value before training, so rising means forgetting)."
    )
    metric: str = Field(
        "eval_loss", description="The evaluation figure that decides the best checkpoint "
        "(`checkpoint.keep_best`) and early stopping, named as in metrics.jsonl: eval_loss; with a classifier "
        "eval_accuracy, eval_f1; with dpo/reward eval_reward_accuracy, eval_reward_margin; with grpo/ppo eval_reward; "
        "with `generate` "
        "eval_exact_match, eval_contains_match; with `reference_data` reference_perplexity."
    )
    metric_direction: Literal["min", "max"] | None = Field(
        None, description="Whether a lower (`min`) or higher (`max`) `metric` is better; default from its name: "
        "max for accuracies, F1, margins and matches, min for losses and perplexities."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop training after this many evaluations in a row without a new best "
        "`metric` (evaluations from step 1 on; the one before training is the baseline, not a candidate). "
        "The run ends (`tunefleet runs` says stopped early) with a checkpoint at the stopping step; relaunching "
        "it trains no further. "
        "Needs `train.eval_every_steps`."
    )

    @model_validator(mode="after")
    def _one_of(self) -> EvalSplit:
        if self.path is not None and self.fraction is not None:
            raise ValueError("set only one of data.eval.path and data.eval.fraction")
        if not self.has_rows:
            used = [key for key in ("generate", "reference_data", "early_stopping_patience")
                    if getattr(self, key) is not None]
            if used:
                raise ValueError(f"data.eval.{used[0]}: runs with the evaluation, which needs held-out rows; "
                                 "set data.eval.path or data.eval.fraction")
        return self

    @property
    def has_rows(self) -> bool:
        """Whether the run evaluates at all (held-out rows from a file or a fraction)."""
        return self.path is not None or self.fraction is not None

    @property
    def direction(self) -> Literal["min", "max"]:
        """`metric_direction`, or the direction its name implies."""
        return self.metric_direction or METRIC_DIRECTIONS.get(self.metric, "min")


# Evaluation figures a best checkpoint or early stopping can follow, and which way is better.
METRIC_DIRECTIONS: dict[str, Literal["min", "max"]] = {
    "eval_loss": "min", "eval_accuracy": "max", "eval_f1": "max", "eval_reward_accuracy": "max",
    "eval_reward_margin": "max", "eval_exact_match": "max", "eval_contains_match": "max", "eval_reward": "max",
    "reference_perplexity": "min", "reference_perplexity_change": "min",
}


def eval_metrics(*, task: str, objective: str, evaluation: EvalSplit | None) -> list[str]:
    """The figures every evaluation of such a run reports (see ``evaluate.objective``), in display order."""
    names = ["eval_loss"]
    if objective in ("dpo", "reward"):
        names += ["eval_reward_accuracy", "eval_reward_margin"]
    elif objective in ONLINE_RL:
        names += ["eval_reward"]  # the recipe's reward of greedy completions
    elif task == "sequence_classification":
        names += ["eval_accuracy", "eval_f1"]
    if evaluation is not None and evaluation.generate is not None:
        names += ["eval_exact_match", "eval_contains_match"]
    if evaluation is not None and evaluation.reference_data is not None:
        names += ["reference_perplexity", "reference_perplexity_change"]
    return names


class DataConfig(Section):
    sources: list[DataSource] = Field(min_length=1, description="Training data sources, mixed by `weight`.")
    eval: EvalSplit | None = Field(None, description="Evaluation split; none disables eval.")
    max_seq_len: int = Field(512, ge=8, description="Tokens per row (per packed row with `packing`).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="Rows longer than `max_seq_len`: cut them, or leave them out (both are counted)."
    )
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens (and on non-assistant turns).")
    packing: bool = Field(
        False, description="Pack whole rows into `max_seq_len` rows (best fit), position ids restarting per row "
        "and no attention across rows; `train.micro_batch_size` then counts packed rows."
    )
    chat_template: Literal["chatml", "llama3"] | None = Field(
        None, description="A built-in chat template for chat rows, used instead of the tokenizer's own; "
        "needed when the tokenizer has none."
    )
    labels: list[str] | None = Field(
        None, min_length=2, description="Class names in label-id order, for `classification` rows whose label "
        "is a name (ints are used as ids)."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A malformed row: stop with its file, line and field, or skip it (skips are counted)."
    )
    num_proc: int = Field(1, ge=1, description="Processes that tokenize in parallel in the one preprocessing task.")
    cache_dir: LocalPath | None = Field(
        None, description="Where tokenized data is cached (shared storage for multi-node); "
        "default `$TUNEFLEET_CACHE/datasets` or `~/.cache/tunefleet/datasets`."
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        kinds = {_format_kind(s.format) for s in self.sources}
        if len(kinds) > 1:
            raise ValueError("data.sources mix formats that train differently "
                             f"({', '.join(sorted(kinds))}); use one kind per recipe")
        kind = kinds.pop()
        if self.packing and kind != "sft":
            raise ValueError(f"data.packing works with sft formats only, not {kind}; set it to false")
        if self.labels is not None and kind != "classification":
            raise ValueError("data.labels names classes of `classification` sources; remove it")
        return self

    @property
    def kind(self) -> Literal["sft", "classification", "preference", "prompt"]:
        """How the rows train: token targets, one class per row, or chosen/rejected pairs."""
        return _format_kind(self.sources[0].format)

    def objective_problems(self, *, task: str, objective: str, num_labels: int | None) -> list[str]:
        """Disagreements with `model.task` / `method.objective`, each starting with the key to change."""
        if task == "sequence_classification" and objective in ("dpo", *ONLINE_RL):
            return [f"method.objective: {objective} trains causal language models; use sft"]
        if objective == "reward" and task != "sequence_classification":
            return ["model.task: method.objective reward trains a one-score head; set model.task: "
                    "sequence_classification and model.num_labels: 1"]
        if objective == "reward" and num_labels != 1:
            return [f"model.num_labels: a reward model gives one score per sequence, not {num_labels}; set it to 1"]
        if task == "sequence_classification" and num_labels == 1 and objective != "reward":
            return ["model.num_labels: 1 is a reward model's single score; set method.objective: reward, "
                    "or 2 or more classes"]
        needed = ("preference" if objective in ("dpo", "reward") else "prompt" if objective in ONLINE_RL
                  else "classification" if task == "sequence_classification" else "sft")
        problems = []
        if self.kind != needed:
            problems.append(f"data.sources: model.task {task} with method.objective {objective} needs "
                            f"{_KIND_FORMATS[needed]} rows, these are {_KIND_FORMATS[self.kind]}")
        if self.labels is not None and num_labels is not None and len(self.labels) != num_labels:
            problems.append(f"data.labels: {len(self.labels)} names but model.num_labels is {num_labels}")
        return problems + self._eval_problems(task) + self._metric_problems(task, objective)

    def _metric_problems(self, task: str, objective: str) -> list[str]:
        if self.eval is None or self.eval.metric == "eval_loss":
            return []
        produced = eval_metrics(task=task, objective=objective, evaluation=self.eval)
        if self.eval.metric not in produced:
            return [f"data.eval.metric: {self.eval.metric} is not reported by this recipe's evaluation; "
                    f"choose one of {', '.join(produced)}"]
        return []

    def _eval_problems(self, task: str) -> list[str]:
        """Generation needs prompts with marked responses; perplexity needs a language model."""
        problems = []
        generate, reference = (self.eval.generate, self.eval.reference_data) if self.eval else (None, None)
        if generate is not None:
            formats = sorted({s.format for s in self.sources} - {"alpaca", "chat", "completion", "prompt"})
            if task != "causal_lm" or formats:
                problems.append("data.eval.generate: needs a causal language model on alpaca/chat/completion/prompt "
                                f"rows (prompts with references), not {task} on {', '.join(formats) or 'these'} "
                                "rows; remove it")
            elif self.train_on_prompt:
                problems.append("data.eval.generate: with data.train_on_prompt the eval rows do not mark where "
                                "the response starts; set data.train_on_prompt: false or remove it")
            elif self.packing:
                problems.append("data.eval.generate: packed eval rows hold several prompts each; set "
                                "data.packing: false or remove it")
        if reference is not None and task != "causal_lm":
            problems.append(f"data.eval.reference_data: perplexity needs a causal language model, not {task}; "
                            "remove it")
        return problems


_KIND_FORMATS = {"sft": "alpaca/chat/completion/text", "classification": "classification",
                 "preference": "preference", "prompt": "prompt"}


def _format_kind(fmt: str) -> Literal["sft", "classification", "preference", "prompt"]:
    return fmt if fmt in ("classification", "preference", "prompt") else "sft"
