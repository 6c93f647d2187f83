"""Gradual unfreezing through `tunefleet launch`: the embeddings stay frozen until their step,
train after it, and a restart across the unfreeze point ends bitwise like an uninterrupted run."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.conftest import tunefleet
from tests.e2e.conftest import FULL, assert_bitwise_equal, final_weights, launch
from tunefleet.launcher.model.tiny import ensure_tiny_model

pytestmark = pytest.mark.e2e

EMBED = "model.embed_tokens.weight"
SCHEDULE = "--set=train.unfreeze_schedule=[{step: 10, modules: [model.embed_tokens]}]"


def test_embeddings_unfreeze_at_their_step_and_resume_is_exact(ray_cluster, tmp_path):
    initial = load_file(ensure_tiny_model("llama") / "model.safetensors")[EMBED]
    plain = tmp_path / "plain"
    launch(FULL, plain, SCHEDULE, address=ray_cluster.address)

    exported = tmp_path / "step8"
    result = tunefleet("export", str(plain), "--step", "8", "--out", str(exported))
    assert result.returncode == 0, result.stderr
    assert load_file(exported / "model.safetensors")[EMBED].equal(initial)  # frozen for steps 1-10
    assert not final_weights(plain)[EMBED].equal(initial)  # trained from step 11 on

    killed = tmp_path / "killed"  # dies after the step-8 checkpoint, resumes before the unfreeze step
    result = launch(FULL, killed, SCHEDULE, "--set=fault_tolerance.max_restarts=1", address=ray_cluster.address,
                    env={"TUNEFLEET_FAULT": "rank=1,step=13,kind=sigkill"})
    assert "restart 1/" in result.stdout and "step_8" in result.stdout
    assert_bitwise_equal(final_weights(killed), final_weights(plain))
