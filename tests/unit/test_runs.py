"""Run-state bookkeeping behind `tunefleet runs`."""

from __future__ import annotations

import json

from tunefleet.launcher.run import folders


def test_a_running_record_whose_driver_died_reads_as_failed(tmp_path):
    folders.record_state(tmp_path, "running", name="r", max_steps=10)
    record = json.loads((tmp_path / "run.json").read_text())
    record["pid"] = 2**22 + 12345  # no such process
    (tmp_path / "run.json").write_text(json.dumps(record))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 1.5, "restarts": 1}) + "\n")
    (described,) = folders.find_runs(tmp_path)
    assert described["state"] == "failed" and described["last_step"] == 3 and described["restarts"] == 1


def test_states_are_found_below_a_folder(tmp_path):
    for name, state in [("a", "finished"), ("b", "preempted")]:
        (tmp_path / name).mkdir()
        folders.record_state(tmp_path / name, state, name=name, max_steps=5)
    assert {r["name"]: r["state"] for r in folders.find_runs(tmp_path)} == {"a": "finished", "b": "preempted"}


def test_the_final_state_says_how_the_workers_ended():
    from tunefleet.launcher.run.driver import _final_state
    from tunefleet.launcher.training.outcome import Outcome, RunState

    assert _final_state(None) == "failed"  # rank 0 never sent its last words
    assert _final_state(Outcome(RunState.PREEMPTED, preflight={}, preempted_at=4)) == "preempted"
    assert _final_state(Outcome(RunState.STOPPED_EARLY, preflight={}, stopped_early_at=12, final_dir="f")) \
        == "stopped early"
    assert _final_state(Outcome(RunState.FINISHED, preflight={}, final_dir="f")) == "finished"
    assert _final_state(Outcome(RunState.PREFLIGHT_FAILED, preflight={}, problems=("node a (rank 0): x",))) \
        == "failed"


def test_startup_breakdown_splits_the_time_to_the_first_step(tmp_path):
    import json

    from tunefleet.launcher.run.driver import startup_breakdown

    worker = tmp_path / "startup.json"
    assert startup_breakdown({"launch": 0.0}, worker) is None  # no step trained by this launch
    worker.write_text(json.dumps({"worker_start": 20.0, "preflight_done": 21.0, "model_loaded": 25.0,
                                  "strategy_ready": 27.5, "first_step_done": 30.0}))
    parts = startup_breakdown({"launch": 0.0, "ray_ready": 4.0, "job_prepared": 9.0}, worker)
    assert parts == {"ray_start": 4.0, "job_preparation": 5.0, "worker_group_start": 11.0, "preflight": 1.0,
                     "model_load": 4.0, "strategy_setup": 2.5, "first_step": 2.5, "total": 30.0}



def test_runs_that_share_a_recipe_name_are_told_apart_by_folder_and_start(tmp_path):
    import time

    from typer.testing import CliRunner

    from tunefleet.launcher.cli.app import app

    starts = {"lr-1e-4": 1_700_000_000.0, "lr-3e-4": 1_700_003_600.0}
    for folder, started in starts.items():
        (tmp_path / folder).mkdir()
        folders.record_state(tmp_path / folder, "running", name="sft", max_steps=5)
        record = json.loads((tmp_path / folder / "run.json").read_text())
        assert abs(record["started"] - time.time()) < 60
        (tmp_path / folder / "run.json").write_text(json.dumps({**record, "started": started}))
        folders.record_state(tmp_path / folder, "finished")  # a later state keeps the start
    assert [(r["name"], r["started"]) for r in folders.find_runs(tmp_path)] == [("sft", s) for s in starts.values()]

    listed = CliRunner().invoke(app, ["runs", str(tmp_path)])  # stdout is not a terminal: full width
    assert listed.exit_code == 0, listed.output
    assert "folder" in listed.output and "started" in listed.output and "…" not in listed.output
    for folder, started in starts.items():
        line = next(line for line in listed.output.splitlines() if str(tmp_path / folder) in line)
        assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) in line
