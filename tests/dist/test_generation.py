"""Greedy generation for evaluation under every strategy on 2 gloo ranks: the same
tokens as the unsharded model, with ranks that stop decoding at different steps
(sharded models gather parameters in every forward, so a rank that finished
must keep stepping until all have)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tunefleet.launcher.evaluation import generation

from .harness import run_ranks
from .test_strategies import ZERO3_OVERRIDES, _save_tiny_llama

pytestmark = pytest.mark.dist

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero3")  # ZeRO-3 last: its config makes later models load partitioned
MAX_NEW_TOKENS = 6


class TokenIds:
    """A tokenizer stand-in that "decodes" to token ids, so the test compares tokens."""

    pad_token_id = 0

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id

    def batch_decode(self, rows, skip_special_tokens: bool):
        return [" ".join(str(int(t)) for t in row if t not in (self.pad_token_id, self.eos_token_id)) for row in rows]


def _uneven_prompts(model: torch.nn.Module, rank: int) -> tuple[list[generation.Prompt], int]:
    """(this rank's prompts, end-of-text token): rank 0's first row ends at its first token, rank 1's never."""
    gen = torch.Generator().manual_seed(7)
    candidates = [generation.Prompt(torch.randint(3, 256, (n,), generator=gen).tolist(), "") for n in range(4, 16)]
    greedy = [model.generate(torch.tensor([p.input_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0].tolist()
              [len(p.input_ids):] for p in candidates]
    eos = greedy[0][0]
    never = [p for p, tokens in zip(candidates, greedy, strict=True) if eos not in tokens]
    return ([candidates[0], never[0]] if rank == 0 else never[1:3]), eos


def _generate_everywhere(model_dir: str) -> dict[str, list[str]]:
    from tunefleet.launcher.model.modeling import load_model, make_optimizer_factory, make_scheduler_factory, param_groups
    from tunefleet.launcher.config import MethodConfig, ModelConfig, TrainConfig
    from tunefleet.strategies.base import StrategyPlan
    from tunefleet.strategies.registry import create

    cpu, rank = torch.device("cpu"), dist.get_rank()
    plain = SimpleNamespace(unwrapped=load_model(ModelConfig(path=model_dir), MethodConfig(), model_dir))
    mine, eos = _uneven_prompts(plain.unwrapped, rank)
    tokenizer = TokenIds(eos)
    out = {"unsharded": generation.generate(plain, mine, tokenizer, batch_size=1, max_new_tokens=MAX_NEW_TOKENS,
                                            device=cpu)}
    train = TrainConfig(max_steps=1)
    for name in STRATEGIES:
        strategy = create(StrategyPlan(
            name=name, world_size=2, num_nodes=1, workers_per_node=2, use_gpu=False, micro_batch_size=1,
            grad_accum_steps=1, max_grad_norm=1.0,
            deepspeed_overrides=ZERO3_OVERRIDES if name == "deepspeed_zero3" else {},
        ))
        model = load_model(ModelConfig(path=model_dir), MethodConfig(), model_dir,
                           init_context=strategy.model_init_context())
        strategy.setup(model, make_optimizer_factory(train), make_scheduler_factory(train), param_groups(model, train))
        out[name] = generation.generate(strategy, mine, tokenizer, batch_size=1, max_new_tokens=MAX_NEW_TOKENS,
                                        device=cpu)
        strategy.teardown()
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def generations(tmp_path_factory) -> list[dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("generation")
    return run_ranks(_generate_everywhere, _save_tiny_llama(root / "model"), workdir=root / "ranks", timeout_s=300)


def test_ranks_stop_at_different_steps(generations):
    assert generations[0]["unsharded"][0] == ""  # rank 0's first batch ended at its first token
    assert all(len(text.split()) == MAX_NEW_TOKENS for text in generations[1]["unsharded"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_generates_what_the_unsharded_model_does(generations, strategy):
    for rank_outputs in generations:
        assert rank_outputs[strategy] == rank_outputs["unsharded"]
