"""The test-only fault plan (TUNEFLEET_FAULT): one fault or several, each firing once per output folder."""

from __future__ import annotations

import pytest

from tunefleet.launcher.training import faults


def test_several_faults_separated_by_semicolons_each_fire_once_at_their_rank_and_step(tmp_path):
    plan = faults.parse("rank=0,step=2,kind=raise; rank=1,step=3,kind=raise,at=checkpoint;")
    assert [(f["rank"], f["step"], f["at"]) for f in plan] == [(0, 2, "step"), (1, 3, "checkpoint")]
    faults.maybe_inject(plan, rank=1, step=2, at="step", output_dir=str(tmp_path))  # another rank: nothing
    faults.maybe_inject(plan, rank=1, step=3, at="step", output_dir=str(tmp_path))  # another place: nothing
    with pytest.raises(faults.InjectedFault, match="rank 0, step 2"):
        faults.maybe_inject(plan, rank=0, step=2, at="step", output_dir=str(tmp_path))
    faults.maybe_inject(plan, rank=0, step=2, at="step", output_dir=str(tmp_path))  # the restart runs past it
    with pytest.raises(faults.InjectedFault, match="rank 1, step 3"):
        faults.maybe_inject(plan, rank=1, step=3, at="checkpoint", output_dir=str(tmp_path))


def test_no_plan_is_an_empty_list_and_a_bad_kind_is_named(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.planned() == []
    with pytest.raises(ValueError, match="kind must be one of"):
        faults.parse("rank=0,step=1,kind=raise;rank=0,step=2,kind=explode")
