"""The `method` section: full fine-tuning or a peft adapter (LoRA, QLoRA, IA3, prefix or prompt tuning),
and the objective it trains with (sft, dpo, reward, grpo, ppo) with online RL's settings (`method.rl`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from tunefleet.launcher.config.base import LocalPath, Section


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


class RewardEntry(Section):
    function: str | None = Field(
        None, description="A built-in (`exact_match`, `contains`, `numeric_match` against the row's `answer`, "
        "`length_penalty`) or your code as `package.module:function` taking (prompt, completion, row) -> float, "
        "importable on every worker."
    )
    model: LocalPath | None = Field(
        None, description="Instead of `function`: a reward model's folder (the final/ of a `method.objective: "
        "reward` run); it scores prompt + completion on every worker."
    )
    weight: float = Field(1.0, description="Its weight in the summed reward.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the function (e.g. `target_chars` of length_penalty)."
    )
    name: str | None = Field(None, description="How metrics name it; default the function's name, or reward_model.")

    @model_validator(mode="after")
    def _one_source(self) -> RewardEntry:
        if (self.function is None) == (self.model is None):
            raise ValueError("give a reward either a `function` or a reward `model` folder, not both or neither")
        if self.model is not None and self.options:
            raise ValueError("options: a reward model takes none; remove them")
        return self


def _reward_list(value: Any) -> Any:
    """A single reward may be written as its function name."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [{"function": item} if isinstance(item, str) else item for item in value]
    return value


class RlConfig(Section):
    """Online RL (method.objective grpo or ppo): completions sampled from the policy, scored by the rewards."""

    group_size: int = Field(
        8, ge=1, description="Completions sampled per prompt; GRPO's advantages compare them (at least 2), PPO "
        "treats each as its own episode (1 is usual)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (1: off).")
    kl_coef: float = Field(
        0.04, ge=0, description="Weight of the per-token KL to the frozen reference (the starting weights; for "
        "adapters the base with adapters disabled); 0 loads no reference."
    )
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="Per-token KL estimate: k3 (never negative) or k1.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="Clip range of the policy ratio, 1 - clip_eps below.")
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip of the ratio, 1 + clip_eps_high (DAPO raises it); default clip_eps."
    )
    epochs: int = Field(
        1, ge=1, description="Optimizer updates on each batch of rollouts (the ratio moves from 1 after the first); "
        "the learning-rate schedule counts train steps, not updates."
    )
    loss_average: Literal["token", "sequence"] = Field(
        "token", description="token: the loss is the mean over every completion token of the global batch; "
        "sequence: per completion first (original GRPO), so long and short completions weigh alike."
    )
    scale_rewards: bool = Field(
        True, description="Divide each group's centred rewards by their std (GRPO); false: Dr. GRPO's unscaled."
    )
    reward: Annotated[list[RewardEntry], BeforeValidator(_reward_list)] = Field(
        default_factory=lambda: [{"function": "exact_match"}],
        description="The rewards, summed with their weights; a name alone is a reward of weight 1.", min_length=1,
    )
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount of later tokens' rewards in GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE's lambda (1: Monte-Carlo returns, 0: one-step TD).")
    vf_coef: float = Field(0.1, gt=0, description="PPO: weight of the value loss beside the policy loss.")
    value_clip_eps: float = Field(
        0.2, gt=0, description="PPO: how far an update may move a value from the one its advantages used."
    )


PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning")  # methods that add virtual tokens instead of weights
ADAPTER_KINDS = ("lora", "qlora", "ia3", *PROMPT_LEARNING)  # everything saved as a peft adapter


ONLINE_RL = ("grpo", "ppo")  # objectives that sample their own completions and train on their rewards


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
    objective: Literal["sft", "dpo", "reward", "grpo", "ppo"] = Field(
        "sft", description="`sft`: next-token loss on target tokens (or the classifier loss); "
        "`dpo`: Direct Preference Optimization on `preference` data against a frozen reference "
        "(LoRA: the base with adapters disabled; full: a frozen copy of the starting weights); "
        "`reward`: a reward model on `preference` data, a one-score head (model.task sequence_classification, "
        "model.num_labels 1) trained with the pairwise loss -log sigmoid(r_chosen - r_rejected); "
        "`grpo`: online RL on `prompt` data, completions sampled by the policy and scored by `method.rl.reward`, "
        "compared within each prompt's group; `ppo`: the same rollouts and rewards, with a value head on the "
        "policy, GAE advantages and the KL to the reference as a per-token penalty (RLHF with a reward model)."
    )
    rl: RlConfig = Field(default_factory=RlConfig, description="Online RL settings (method.objective grpo, ppo).")
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
        self._rl_settings_used()
        if self.kind in PROMPT_LEARNING and self.objective in ("dpo", *ONLINE_RL):
            # DPO's and online RL's reference is the policy with adapters disabled; prompt tuning's logits
            # then change length. Not built yet rather than silently misaligned.
            raise ValueError(f"method.objective: {self.objective} is not supported with method.kind {self.kind}; "
                             "use lora or ia3")
        return self

    def _rl_settings_used(self) -> None:
        rl = self.rl
        # Compared with the defaults, not with the keys given: a resolved recipe (recipe.resolved.yaml) holds them all.
        given = {name for name, info in RlConfig.model_fields.items() if getattr(rl, name) != info.get_default(
            call_default_factory=True)}
        if self.objective == "grpo" and rl.group_size < 2:
            raise ValueError("method.rl.group_size: GRPO compares completions of the same prompt; sample at least 2 "
                             "(or use method.objective: ppo, whose value head needs no group)")
        ppo_only = sorted(given & {"gamma", "lam", "vf_coef", "value_clip_eps"})
        if self.objective != "ppo" and ppo_only:
            raise ValueError(f"method.rl.{ppo_only[0]}: only PPO's value head and GAE use it; remove it or set "
                             "method.objective: ppo")
        if self.objective == "ppo" and "scale_rewards" in given:
            raise ValueError("method.rl.scale_rewards: only GRPO scales rewards within a group (PPO whitens its "
                             "advantages); remove it")
        if self.objective == "ppo" and rl.loss_average != "token":
            raise ValueError("method.rl.loss_average: PPO's advantages and value loss are per token, averaged over "
                             "tokens; remove it")

    @property
    def online_rl(self) -> bool:
        """Sampling its own completions (``method.rl``) from `prompt` rows: GRPO or PPO."""
        return self.objective in ONLINE_RL
