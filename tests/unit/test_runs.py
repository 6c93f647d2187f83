"""Run-state bookkeeping behind `tunefleet runs`."""

from __future__ import annotations

import json

from tunefleet.launcher import runs


def test_a_running_record_whose_driver_died_reads_as_failed(tmp_path):
    runs.record_state(tmp_path, "running", name="r", max_steps=10)
    record = json.loads((tmp_path / "run.json").read_text())
    record["pid"] = 2**22 + 12345  # no such process
    (tmp_path / "run.json").write_text(json.dumps(record))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.5, "restarts": 1}) + "\n")
    (described,) = runs.find_runs(tmp_path)
    assert described["state"] == "failed" and described["last_step"] == 3 and described["restarts"] == 1


def test_states_are_found_below_a_folder(tmp_path):
    for name, state in [("a", "finished"), ("b", "preempted")]:
        (tmp_path / name).mkdir()
        runs.record_state(tmp_path / name, state, name=name, max_steps=5)
    assert {r["name"]: r["state"] for r in runs.find_runs(tmp_path)} == {"a": "finished", "b": "preempted"}


def test_the_final_state_says_how_the_workers_ended():
    from tunefleet.launcher.driver import _final_state

    assert _final_state({}) == "failed"  # rank 0 never sent its last words
    assert _final_state({"preempted_at": 4}) == "preempted"
    assert _final_state({"stopped_early_at": 12, "final_dir": "f"}) == "stopped early"
    assert _final_state({"stopped_early_at": None, "final_dir": "f"}) == "finished"
