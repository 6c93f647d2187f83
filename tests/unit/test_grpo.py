"""GRPO's step (launcher/objectives/grpo.py) and rollouts (rollout.py) in one process: prompt rows in,
rows for the update out, and one update that moves the policy towards the completions its group rewards."""

from __future__ import annotations

import pytest
import torch

from tunefleet.launcher.config import RlConfig
from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.objectives import grpo
from tunefleet.launcher.objectives.rl_rewards import RewardError, RewardSpec, WeightedRewards
from tunefleet.launcher.objectives.rollout import cut_at_end, left_padded, rollout_seed, seeded

EOS, PAD = 2, 0


class Ids:
    """A tokenizer stand-in whose text is the token ids, so tests read tokens."""

    pad_token_id, eos_token_id = PAD, EOS

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(t)) for t in ids if not (skip_special_tokens and t in (PAD, EOS)))

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(row, skip_special_tokens) for row in rows]


def prompt_batch(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Collated prompt rows (prompt ids, answer ids), right-padded as ``batches.collate`` pads them."""
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), PAD)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        input_ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
        mask[i, :len(prompt) + len(answer)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def test_prompts_of_splits_each_row_into_prompt_and_answer_text():
    got = grpo.prompts_of([prompt_batch([([5, 6, 7], [9]), ([8], [10, 11])])], Ids())
    assert got.prompt_ids == [[5, 6, 7], [8]]
    assert got.rows == [{"prompt": "5 6 7", "answer": "9"}, {"prompt": "8", "answer": "10 11"}]


def test_training_rows_mark_completion_tokens_and_repeat_prompts_per_group():
    rows = grpo.training_rows([[5, 6], [7]], [[3, EOS], [4, 4, 4], [], [9, EOS]], torch.tensor([1., -1., .5, -.5]),
                              group_size=2, pad_id=PAD)
    assert rows["input_ids"].tolist() == [[5, 6, 3, EOS, PAD], [5, 6, 4, 4, 4], [7, PAD, PAD, PAD, PAD],
                                          [7, 9, EOS, PAD, PAD]]
    assert rows["labels"].tolist() == [[-100, -100, 3, EOS, -100], [-100, -100, 4, 4, 4], [-100] * 5,
                                       [-100, 9, EOS, -100, -100]]
    assert rows["attention_mask"].sum(-1).tolist() == [4, 5, 1, 3]
    pieces = grpo.split_rows(rows, 2)
    assert [p["input_ids"].shape for p in pieces] == [(2, 5), (2, 3)]  # each cut to its longest row
    assert pieces[1]["advantages"].tolist() == [.5, -.5]


def test_rollout_helpers():
    assert cut_at_end([4, 5, EOS, 0, 0], EOS) == [4, 5, EOS] and cut_at_end([4, 5], EOS) == [4, 5]
    padded = left_padded([[1, 2, 3], [4]], PAD)
    assert padded["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    seeds = {rollout_seed(0, step, rank) for step in range(3) for rank in range(2)}
    assert len(seeds) == 6 and rollout_seed(0, 1, 1) == rollout_seed(0, 1, 1)


def test_seeded_sampling_leaves_the_training_rng_where_it_was():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with seeded(11, torch.device("cpu")):
        inside = torch.rand(2)
    assert torch.equal(torch.rand(2), expected)
    with seeded(11, torch.device("cpu")):
        assert torch.equal(torch.rand(2), inside)


def tiny_policy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=16, max_position_embeddings=32, eos_token_id=EOS,
                         pad_token_id=PAD)
    return LlamaForCausalLM(config)


class Plain:
    """A single-process strategy: the model, plain backward and an SGD step."""

    def __init__(self, model, lr):
        self.model = self.unwrapped = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def no_sync(self, skip):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def optimizer_step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()
        return None


class FixedRollout:
    """The same completions for every call: token 7 or token 8, then the end of text."""

    def sample(self, prompts, *, num_samples, seed):
        return [[7 if i % 2 == 0 else 8, EOS] for _ in prompts for i in range(num_samples)]


def says_seven(prompt, completion, row):
    return float(completion.strip() == "7")


def test_one_update_raises_the_probability_of_the_rewarded_completion():
    model = tiny_policy()
    rewards = WeightedRewards.from_specs([RewardSpec(f"{__name__}:says_seven")])
    rl = RlConfig(group_size=4, kl_coef=0.0, max_new_tokens=2)
    objective = grpo.Grpo(rl, rewards, FixedRollout(), Ids(), reference=None, seed=0, rows_per_micro_batch=4)
    prompts = [prompt_batch([([5, 6], [7]), ([9], [7])])]

    def p_seven():
        with torch.no_grad():
            logits = model(torch.tensor([[5, 6]])).logits[0, -1]
        return float(logits.softmax(-1)[7])

    before = p_seven()
    result = objective.step(Plain(model, lr=0.5), prompts, torch.device("cpu"), step=0)
    assert p_seven() > before
    figures = result.metrics()
    assert figures["reward_mean"] == 0.5 and figures["reward_says_seven"] == 0.5
    assert figures["completion_len"] == 2.0 and figures["clip_fraction"] == 0.0 and figures["ratio"] == 1.0
    assert result.num_tokens == 16 and figures["zero_std_groups"] == 0.0
    # Ratio 1 on the first update: the loss is -mean advantage over tokens, 0 for centred advantages.
    assert result.loss == pytest.approx(0.0, abs=1e-6)


def test_a_reward_that_raises_names_the_row():
    rewards = WeightedRewards.from_specs([RewardSpec(f"{__name__}:broken")])
    objective = grpo.Grpo(RlConfig(group_size=2, kl_coef=0.0), rewards, FixedRollout(), Ids(), reference=None,
                          seed=0, rows_per_micro_batch=2)
    with pytest.raises(RewardError, match="broken"):
        objective.step(Plain(tiny_policy(), lr=0.1), [prompt_batch([([5], [7])])], torch.device("cpu"), step=0)


def broken(prompt, completion, row):
    raise KeyError("score")


def test_sampling_is_a_function_of_the_seed_only():
    from tunefleet.launcher.objectives.rollout import ColocatedRollout

    model = tiny_policy()
    rollout = ColocatedRollout(Plain(model, lr=0.0), Ids(), max_new_tokens=5, temperature=1.0, top_p=1.0,
                               batch_size=3, device=torch.device("cpu"))
    first = rollout.sample([[5, 6], [9]], num_samples=3, seed=rollout_seed(0, 4, 1))
    torch.rand(10)  # other consumers of the global RNG in between change nothing
    assert rollout.sample([[5, 6], [9]], num_samples=3, seed=rollout_seed(0, 4, 1)) == first
    assert rollout.sample([[5, 6], [9]], num_samples=3, seed=rollout_seed(0, 5, 1)) != first
    assert len(first) == 6 and all(1 <= len(c) <= 5 and EOS not in c[:-1] for c in first)


class GreedyFixedRollout(FixedRollout):
    def greedy(self, prompts):
        return [[7, EOS] if i % 2 == 0 else [8, EOS] for i in range(len(prompts))]


def test_evaluation_scores_greedy_completions_of_real_rows_only():
    rewards = WeightedRewards.from_specs([RewardSpec(f"{__name__}:says_seven")])
    objective = grpo.Grpo(RlConfig(group_size=2, kl_coef=0.0), rewards, GreedyFixedRollout(), Ids(), reference=None,
                          seed=0, rows_per_micro_batch=2)
    padding_row = {"input_ids": torch.tensor([[PAD]]), "labels": torch.tensor([[IGNORE_INDEX]]),
                   "attention_mask": torch.tensor([[1]])}  # what collate gives a rank with no rows left
    batches = [prompt_batch([([5, 6], [7]), ([9], [8])]), prompt_batch([([4], [7])]), padding_row]
    figures = objective.evaluate(Plain(tiny_policy(), lr=0.0), batches, torch.device("cpu"))
    # greedy: row 0 -> "7", row 1 -> "8", row 2 -> "7" (each batch restarts), the padding row is not counted
    assert figures["eval_reward"] == pytest.approx(2 / 3)
    assert figures["eval_loss"] > 0


def test_lora_reference_is_the_base_with_adapters_disabled():
    """At the start a LoRA policy equals its base (B = 0), so the KL to the reference is exactly 0."""
    import peft

    model = peft.get_peft_model(tiny_policy(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rewards = WeightedRewards.from_specs([RewardSpec(f"{__name__}:says_seven")])
    objective = grpo.Grpo(RlConfig(group_size=4, kl_coef=0.1), rewards, FixedRollout(), Ids(), reference=None,
                          seed=0, rows_per_micro_batch=4)
    strategy = Plain(model, lr=0.5)
    first = objective.step(strategy, [prompt_batch([([5, 6], [7])])], torch.device("cpu"), step=0)
    assert first.metrics()["kl"] == 0.0
    second = objective.step(strategy, [prompt_batch([([5, 6], [7])])], torch.device("cpu"), step=1)
    assert second.metrics()["kl"] > 0  # the adapters moved; the reference did not


def test_a_reward_model_scores_prompt_and_completion(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tunefleet.launcher.model.tiny import build_tokenizer
    from tunefleet.launcher.objectives.rl_rewards import ModelReward, check_rewards, reward_model_problem

    tokenizer = build_tokenizer(["the capital of Veloria is Marenth"] * 4, vocab_size=300)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    assert reward_model_problem(str(tmp_path / "rm")) is None
    reward = ModelReward(str(tmp_path / "rm"), device="cpu", batch_size=2)
    rows = [{"prompt": "q", "answer": "a"}] * 3
    scores = reward(["the capital ", "the capital ", "of "], ["Marenth", "Veloria", "is"], rows)
    assert len(scores) == 3 and len(set(scores)) == 3
    # batched as scored one at a time (right padding does not change a score)
    assert scores[2] == pytest.approx(reward(["of "], ["is"], rows[:1])[0], abs=1e-5)
    check_rewards([RewardSpec(model=str(tmp_path / "rm"))], rows[0])  # a reward model passes the driver's check

    LlamaForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": 3})).save_pretrained(
        tmp_path / "classifier")
    assert "is not a reward model" in reward_model_problem(str(tmp_path / "classifier"))
    assert "no config.json" in reward_model_problem(str(tmp_path / "missing"))
    with pytest.raises(RewardError, match="reward model .*classifier is not a reward model"):
        check_rewards([RewardSpec(model=str(tmp_path / "classifier"))], rows[0])
