"""Every strategy through `tunefleet launch` on a real local Ray: a worker is
SIGKILLed mid-run and the final weights are bitwise equal to an uninterrupted
run of the same strategy; full fine-tuning and LoRA."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import FULL, LORA, assert_bitwise_equal, final_weights, launch, read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]  # two launches per test

SHORT = ["--set=train.max_steps=12", "--set=checkpoint.every_steps=4", "--set=train.eval_every_steps=null",
         "--set=fault_tolerance.max_restarts=2"]
ASYNC = ("--set=checkpoint.async=true",)
CASES = [("ddp", LORA, ()), ("fsdp", FULL, ()), ("fsdp", LORA, ()), ("fsdp", FULL, ASYNC),
         ("deepspeed_zero3", FULL, ()), ("deepspeed_zero3", LORA, ()), ("deepspeed_zero2", FULL, ())]
IDS = [f"{s}-{'lora' if r == LORA else 'full'}{'-async' if extra else ''}" for s, r, extra in CASES]


@pytest.mark.parametrize("strategy,recipe,extra", CASES, ids=IDS)
def test_sigkill_resume_is_bitwise(ray_cluster, tmp_path, strategy, recipe, extra):
    choose = f"--set=parallelism.strategy={strategy}"
    args = [choose, *SHORT, *extra]
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    launch(recipe, clean, *args, address=ray_cluster.address)
    result = launch(recipe, faulty, *args, address=ray_cluster.address,
                    env={"TUNEFLEET_FAULT": "rank=1,step=6,kind=sigkill"})
    assert (faulty / ".fault-rank1-step6-step").exists() and "step_4" in result.stdout
    assert f"strategy {strategy}" in result.stdout
    assert_bitwise_equal(final_weights(faulty), final_weights(clean))
    losses = [r["loss"] for r in read_metrics(clean)[0]]
    assert [r["loss"] for r in read_metrics(faulty)[0]] == losses
    assert losses[-1] < losses[0]
