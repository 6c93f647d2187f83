"""Rollouts for online RL: completions sampled from the current policy for a batch of prompts.

The loss code sees only ``Rollout.sample``: token ids in, ``num_samples`` completions per prompt out.
``ColocatedRollout`` samples on the training workers themselves with Hugging Face ``generate`` (KV
cache, sampling as the recipe asks); a pool of Ray generation actors, or an inference engine on GPUs,
implements the same method and plugs in without touching the loss.

Sampling is seeded by (run seed, step, rank) alone and runs under a forked RNG, so the rollouts of a
step do not depend on what ran before it: a run resumed after a SIGKILL samples exactly what the
uninterrupted run sampled. Sharded models (FSDP2, ZeRO-3) gather parameters in every forward, so every
rank generates the same number of batches with ``synced_gpus`` (a rank that finished early keeps
stepping until all have).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from tunefleet.strategies.base import Strategy


class Rollout(Protocol):
    def sample(self, prompts: Sequence[Sequence[int]], *, num_samples: int, seed: int) -> list[list[int]]:
        """``num_samples`` completions of every prompt, prompt-major (prompt 0's first); each ends with the
        end-of-text token when the policy wrote one, and holds no padding."""


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one rank's rollouts at one step (independent streams per step and rank)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts aligned on the right, as decoding continues them."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[i, width - len(prompt):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def cut_at_end(tokens: Sequence[int], eos_id: int | None) -> list[int]:
    """A sampled row up to and including its first end-of-text token (the rest is padding)."""
    tokens = [int(t) for t in tokens]
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


class ColocatedRollout:
    """Sampling on the training workers with the policy's own ``generate``."""

    def __init__(self, strategy: Strategy, tokenizer, *, max_new_tokens: int, temperature: float, top_p: float,
                 batch_size: int, device: torch.device):
        self.strategy, self.tokenizer, self.device = strategy, tokenizer, device
        self.batch_size = batch_size
        self.sampling = {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature,
                         "top_p": top_p, "top_k": 0, "num_beams": 1}

    def sample(self, prompts: Sequence[Sequence[int]], *, num_samples: int, seed: int) -> list[list[int]]:
        repeated = [prompt for prompt in prompts for _ in range(num_samples)]
        with seeded(seed, self.device):
            return self.generate(repeated, self.sampling)

    def greedy(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Greedy completions (evaluation), ``batch_size`` at a time: ranks with as many prompts decode in step."""
        return self.generate(prompts, {**self.sampling, "do_sample": False, "temperature": None, "top_p": None,
                                       "top_k": None})

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], settings: dict) -> list[list[int]]:
        model = self.strategy.unwrapped
        was_training = model.training
        model.eval()
        synced = dist.is_initialized() and dist.get_world_size() > 1
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        completions = []
        for start in range(0, len(prompts), self.batch_size):
            batch = {k: v.to(self.device) for k, v in left_padded(prompts[start:start + self.batch_size],
                                                                   pad_id).items()}
            tokens = model.generate(**batch, **settings, synced_gpus=synced, pad_token_id=pad_id, eos_token_id=eos_id)
            completions += [cut_at_end(row, eos_id) for row in tokens[:, batch["input_ids"].shape[1]:].tolist()]
        model.train(was_training)
        return completions


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Sampling from ``seed`` without disturbing the training RNG streams (CPU and this CUDA device)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield
