"""The launch console's summary: speed over the steps actually trained, restarts, and evaluations from the
run's history."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

from rich.console import Console

from tunefleet.launcher.run.console import LaunchConsole


def _row(step: int, tokens_per_s: float, step_time_s: float) -> dict:
    return {"event": "metrics", "step": step, "loss": 1.0 / step, "tokens_per_s": tokens_per_s,
            "step_time_s": step_time_s, "tokens_seen": 100 * step}


def _console() -> tuple[LaunchConsole, io.StringIO]:
    out = io.StringIO()
    return LaunchConsole(console=Console(file=out, width=200)), out


def test_a_restart_is_one_line_and_speed_counts_only_trained_steps(tmp_path):
    console, out = _console()
    events = [{"event": "start", "start_step": 0, "resumed_from": None},
              _row(1, 10.0, 10.0), _row(2, 100.0, 1.0), _row(3, 100.0, 1.0),
              {"event": "start", "start_step": 2, "resumed_from": "ckpt/step_2"},
              _row(3, 5.0, 20.0), _row(4, 100.0, 1.0)]
    with console.progress(4):
        console.update(events)
    summary = console.summary(tmp_path, wall_time_s=60.0)
    assert summary["restarts"] == 1
    assert out.getvalue().count("restart 1 from ckpt/step_2") == 1
    # steps 2 and 4 (3 is the restarted attempt's first step, 1 the first attempt's): 200 tokens in 2 s
    assert summary["tokens_per_s"] == 100.0


def test_eval_before_is_step_0_of_the_run_and_after_the_last_evaluation_made(tmp_path):
    rows = [{"step": 0, "eval_loss": 6.0}, {"step": 2, "loss": 3.0}, {"step": 2, "eval_loss": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    console, _ = _console()
    with console.progress(4):  # a resumed launch: it evaluates only at its end
        console.update([{"event": "start", "start_step": 2, "resumed_from": "ckpt/step_2"},
                        _row(3, 100.0, 1.0), {"event": "metrics", "step": 4, "eval_loss": 3.5}])
    (tmp_path / "metrics.jsonl").open("a").write(json.dumps({"step": 4, "eval_loss": 3.5}) + "\n")
    summary = console.summary(tmp_path, wall_time_s=1.0)
    assert (summary["eval_loss_before"], summary["eval_loss_after"]) == (6.0, 3.5)


def test_no_evaluation_after_step_0_leaves_after_empty(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss": 6.0}) + "\n")
    console, _ = _console()
    with console.progress(10):  # stopped (SIGTERM) before the next evaluation
        console.update([{"event": "start", "start_step": 0, "resumed_from": None}, _row(1, 1.0, 1.0)])
    summary = console.summary(tmp_path, wall_time_s=1.0)
    assert summary["eval_loss_before"] == 6.0 and summary["eval_loss_after"] is None


def test_the_finish_event_carries_a_typed_outcome_that_survives_pickling(tmp_path):
    import pickle

    from tunefleet.launcher.training.metrics import Reporter
    from tunefleet.launcher.training.outcome import Outcome, RunState

    sent = []
    reporter = Reporter(enabled=True, output_dir=str(tmp_path), hub=LocalHub(sent))
    best = {"metric": "eval_loss", "direction": "min", "value": 2.5, "step": 4, "evals_without_improvement": 2}
    reporter.finish(Outcome(RunState.STOPPED_EARLY, preflight={"nodes": ["a"]}, stopped_early_at=12,
                            final_dir=str(tmp_path / "final"), final_step=4, best=best))
    (event,) = [pickle.loads(pickle.dumps(message)) for message in sent]  # as Ray carries it to the hub
    assert event["outcome"].state is RunState.STOPPED_EARLY
    console, out = _console()
    with console.progress(24):
        console.update([{"event": "start", "start_step": 0, "resumed_from": None}, _row(12, 1.0, 1.0), event])
    summary = console.summary(tmp_path, wall_time_s=1.0)
    assert summary["final_dir"] == str(tmp_path / "final")
    assert (summary["stopped_early_at"], summary["best_step"], summary["final_from_step"]) == (12, 4, 4)
    assert "stopped early at step 12 of 24" in out.getvalue()


def test_a_start_keeps_the_rows_up_to_its_checkpoint_and_a_start_without_one_none(tmp_path):
    """A restart before the first checkpoint redoes the evaluation at step 0: its row is not there twice."""
    import json

    from tunefleet.launcher.training.metrics import Reporter

    reporter = Reporter(enabled=True, output_dir=str(tmp_path), hub=LocalHub([]))
    reporter.start(start_step=0, resumed_from=None)
    for step, key in ((0, "eval_loss"), (1, "loss"), (2, "loss"), (3, "loss")):
        reporter.log({"step": step, key: 1.0})
    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in reporter.path.read_text().splitlines()]

    reporter.start(start_step=2, resumed_from=tmp_path / "checkpoints" / "step_2")
    assert steps() == [0, 1, 2]
    reporter.start(start_step=0, resumed_from=None)
    assert steps() == []


class LocalHub:
    """The hub's ``put`` called in place (control.HubActor is the Ray actor)."""

    def __init__(self, sink: list):
        self.put = SimpleNamespace(remote=sink.append)
