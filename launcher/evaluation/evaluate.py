"""Evaluation: what every evaluation computes, during training and in `tunefleet eval`.

The figures of one evaluation come from the objective (the token loss; a classifier's accuracy and
macro F1; a reward model's or DPO's pair accuracy and margin), plus greedy-generation matches with
``data.eval.generate`` and the reference perplexity with ``data.eval.reference_data``. Every figure
is reduced over ranks, so all ranks hold the same values.

`tunefleet eval` (``run/eval.py`` on the driver, ``training.worker.eval_loop_per_worker`` on the workers)
evaluates an exported model or adapter with the same code: ``load_trained`` puts its weights into the
module training builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tunefleet.launcher.config import MethodConfig, ModelConfig
from tunefleet.launcher.config.data import EvalSplit, GenerateEval
from tunefleet.launcher.data import batches
from tunefleet.launcher.errors import UserError
from tunefleet.launcher.evaluation import generation
from tunefleet.launcher.model import modeling
from tunefleet.launcher.objectives.select import EvaluateFn
from tunefleet.launcher.objectives.sft import evaluate
from tunefleet.strategies.base import Strategy


@dataclass(frozen=True)
class EvalInputs:
    """This rank's share of the evaluation data, batched, and how to decode from its prompts."""

    batches: list
    batch_size: int  # rows per forward, and per greedy-decoding batch
    prompts: list | None  # greedy-generation prompts (data.eval.generate)
    generate: GenerateEval | None
    reference: list | None  # forgetting-watch batches (data.eval.reference_data)


def open_eval_inputs(settings: EvalSplit | None, data_dir: str, tokenizer, *, rank: int, world_size: int,
                     batch_size: int) -> EvalInputs | None:
    """Batches of the prepared eval (and reference) split, as ``data.eval`` (``settings``) asks; None when the
    data has no eval split."""
    eval_split = batches.open_split(Path(data_dir), "eval")
    if eval_split is None:
        return None
    pad_id = tokenizer.pad_token_id
    generate = settings.generate if settings is not None else None
    reference_split = batches.open_split(Path(data_dir), "reference")
    return EvalInputs(
        batches=batches.eval_batches(eval_split, rank=rank, world_size=world_size, batch_size=batch_size,
                                     max_rows=settings.max_rows if settings else None, pad_id=pad_id),
        batch_size=batch_size,
        prompts=(generation.rank_prompts(eval_split, tokenizer, max_prompts=generate.max_prompts, rank=rank,
                                         world_size=world_size) if generate is not None else None),
        generate=generate,
        reference=(batches.eval_batches(reference_split, rank=rank, world_size=world_size, batch_size=batch_size,
                                        max_rows=None, pad_id=pad_id) if reference_split is not None else None),
    )


def evaluate_all(strategy: Strategy, inputs: EvalInputs, evaluate_fn: EvaluateFn, tokenizer, *,
                 device: torch.device) -> dict[str, float]:
    """Collective: every figure of one evaluation (``evaluate_fn``: the objective's), the same on every rank."""
    row = dict(evaluate_fn(strategy, inputs.batches, device))
    if inputs.prompts is not None:
        row |= generation.evaluate_generation(strategy, inputs.prompts, tokenizer, batch_size=inputs.batch_size,
                                              max_new_tokens=inputs.generate.max_new_tokens, device=device)
    if inputs.reference is not None:
        row["reference_perplexity"] = math.exp(evaluate(strategy, inputs.reference, device))
    return row


def load_trained(model: ModelConfig, method: MethodConfig, base_path: str, weights_dir: str,
                 init_context) -> torch.nn.Module:
    """Exported weights in the module training builds: a full model folder (``weights_dir``) loaded as the
    model, or the base (``base_path``) with the method's adapter attached and its weights loaded from the
    adapter folder."""
    if method.kind == "full":
        return modeling.load_model(model, method, weights_dir, init_context=init_context)
    import peft

    module = modeling.load_model(model, method, base_path, init_context=init_context)
    loaded = peft.set_peft_model_state_dict(module, peft.load_peft_weights(weights_dir, device="cpu"))
    if loaded.unexpected_keys:
        raise UserError(f"{weights_dir}: adapter weights {loaded.unexpected_keys[:3]} do not fit the recipe's "
                        f"method ({method.kind}); pass the --recipe the adapter was trained with")
    return module
