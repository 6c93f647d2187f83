"""Generation-based evaluation: greedy decoding from held-out prompts, matched with their references.

A prompt is a tokenized eval row up to its last response (the last run of
target tokens: the output of alpaca and completion rows, the last assistant
turn of chat rows); the reference is that response. Matching normalizes both
texts (strip, case-fold): exact match compares them whole, contains-match asks
whether the reference occurs in the generation.

Sharded models (FSDP2, ZeRO-3) gather parameters in every forward, so every
rank must run the same forwards: each rank gets the same number of prompt
batches (short ranks decode a copy of a prompt that is not counted), and
``generate(synced_gpus=True)`` keeps a rank that finished early stepping until
all ranks have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from tunefleet.launcher import collectives
from tunefleet.launcher.data.batches import TokenizedSplit
from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.objectives.rollout import left_padded
from tunefleet.strategies.base import Strategy


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    reference: str
    counted: bool = True  # False: padding that keeps ranks in step


def normalize(text: str) -> str:
    return text.strip().casefold()


def match_counts(generated: list[str], references: list[str]) -> tuple[int, int]:
    """(exact matches, contains-matches) of generations against their references, normalized."""
    exact = contains = 0
    for output, reference in zip(generated, references, strict=True):
        output, reference = normalize(output), normalize(reference)
        exact += output == reference
        contains += reference in output
    return exact, contains


def split_prompt(input_ids: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]] | None:
    """(prompt ids, response ids) of one row: the response is its last run of target tokens; None without one."""
    targets = np.flatnonzero(np.asarray(labels) != IGNORE_INDEX)
    if len(targets) == 0 or targets[0] == 0:
        return None
    end = int(targets[-1]) + 1
    gaps = np.flatnonzero(np.diff(targets) > 1)
    start = int(targets[gaps[-1] + 1]) if len(gaps) else int(targets[0])
    ids = [int(t) for t in input_ids]
    return ids[:start], ids[start:end]


def rank_prompts(split: TokenizedSplit, tokenizer, *, max_prompts: int, rank: int,
                 world_size: int) -> list[Prompt]:
    """This rank's share of the first ``max_prompts`` eval rows with a response, padded to an equal count."""
    prompts = []
    for row in range(len(split)):
        if len(prompts) == max_prompts:
            break
        parts = split_prompt(*split.row(row))
        if parts is not None:
            prompts.append(Prompt(parts[0], tokenizer.decode(parts[1], skip_special_tokens=True)))
    mine = prompts[rank::world_size]
    per_rank = -(-len(prompts) // world_size)
    filler = Prompt(prompts[0].input_ids, "", counted=False) if prompts else None
    return mine + [filler] * (per_rank - len(mine))


@torch.no_grad()
def generate(strategy: Strategy, prompts: list[Prompt], tokenizer, *, batch_size: int, max_new_tokens: int,
             device: torch.device) -> list[str]:
    """Greedy continuations of ``prompts``, decoded without special tokens (the end of text stops a row)."""
    model = strategy.unwrapped
    was_training = model.training
    model.eval()
    outputs = []
    synced = dist.is_initialized() and dist.get_world_size() > 1
    for start in range(0, len(prompts), batch_size):
        padded = left_padded([p.input_ids for p in prompts[start:start + batch_size]], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in padded.items()}
        tokens = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, synced_gpus=synced,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        new = tokens[:, batch["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    return outputs


def evaluate_generation(strategy: Strategy, prompts: list[Prompt], tokenizer, *, batch_size: int,
                        max_new_tokens: int, device: torch.device) -> dict[str, float]:
    """Exact and contains-match shares over every rank's counted prompts."""
    generated = generate(strategy, prompts, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         device=device)
    counted = [(g, p.reference) for g, p in zip(generated, prompts, strict=True) if p.counted]
    exact, contains = match_counts([g for g, _ in counted], [r for _, r in counted])
    totals = torch.tensor([exact, contains, len(counted)], dtype=torch.float64, device=device)
    exact, contains, num = collectives.all_reduce(totals).tolist()
    return {"eval_exact_match": exact / max(num, 1.0), "eval_contains_match": contains / max(num, 1.0)}
