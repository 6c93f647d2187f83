"""The peers benchmark's figure arithmetic and the docs/benchmarks.md renderer, on made-up results (no timings)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield {name: importlib.import_module(name) for name in ("harness", "peers", "report")}
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_row(system: str, round_: int, tokens_per_s: float, first_step_s: float, **extra) -> dict:
    return {"system": system, "round": round_, "tokens_per_s": tokens_per_s, "first_step_s": first_step_s,
            "tokens_per_rank_cpu_s": tokens_per_s * 1.1, "wall_s": 60.0, "peak_rss_bytes": 2 * 2**30,
            "held_bytes": 600 * 2**20, "mfu": 0.1, "mfu_logged": None, "packing_efficiency": 0.84,
            "rank_cpu_cores": 1.9, "loss_step_1": 7.25, "flops_per_token": 3e8, "loss_last": 5.5,
            "tokens_per_step": [868, 880], **extra}


@pytest.fixture
def result(bench):
    peers = bench["peers"]
    systems = ["tunefleet-ddp", "torchrun", "trl"]
    runs = [run_row("tunefleet-ddp", r, t, 30.0) for r, t in enumerate((100.0, 90.0, 120.0))]
    runs += [run_row("torchrun", r, t, 15.0) for r, t in enumerate((110.0, 100.0, 95.0))]
    runs += [run_row("trl", r, t, 25.0) for r, t in enumerate((80.0, 70.0, 60.0))]
    runs.append({"system": "trl", "round": 3, "error": "accelerate exited 1; see trl-3.log"})
    return {"command": "python benchmarks/peers.py --rounds 3", "model": {"path": "tiny:llama-50m", "num_params": 51e6},
            "config": {"systems": systems, "rounds": 3, "seq_len": 128, "micro_batch": 4, "steps": 16, "warmup": 3},
            "machine": {"date": "2026-12-01T13:00:00+00:00", "cpu_model": "AMD EPYC", "cpu_count": 2, "ram_gib": 23.5,
                        "platform": "Linux", "python": "3.11.7", "load_avg": [1.0, 2.0, 3.0]},
            "code": {"code": "working tree", "git_commit": "abcdef0123", "code_digest": "0123"},
            "versions": {"trl": "1.16.0", "accelerate": "1.15.0"}, "peak_flops_per_rank": 30e9,
            "peak_flops_samples": [29e9, 30e9], "commands": {s: f"run {s}" for s in systems}, "runs": runs,
            **peers.summarize(runs, systems), "checks": peers.checks(runs)}


def test_median_and_ratio_skip_missing_values(bench):
    harness = bench["harness"]
    assert harness.median([3.0, None, 1.0, 2.0]) == 2.0
    assert harness.median([None]) is None
    assert harness.ratio(3.0, 2.0) == 1.5
    assert harness.ratio(None, 2.0) is None and harness.ratio(3.0, 0.0) is None


def test_mfu_is_model_flops_over_the_ranks_peak(bench):
    # 100 tokens/s x 6e8 FLOPs per token = 6e10 FLOP/s against 2 ranks x 6e10 peak.
    assert bench["peers"].mfu(100.0, 6e8, 6e10, 2) == pytest.approx(0.5)


def test_summary_takes_medians_over_rounds_and_ratios_of_medians(result):
    assert result["medians"]["tunefleet-ddp"]["tokens_per_s"] == 100.0
    assert result["medians"]["trl"]["tokens_per_s"] == 70.0  # the failed round is left out
    assert result["ratios"]["torchrun"]["tunefleet-ddp"]["tokens_per_s"] == pytest.approx(100.0 / 100.0)
    assert result["ratios"]["trl"]["tunefleet-ddp"]["tokens_per_s"] == pytest.approx(100.0 / 70.0)
    assert result["ratios"]["trl"]["tunefleet-ddp"]["first_step_s"] == pytest.approx(30.0 / 25.0)


def test_checks_flag_runs_that_did_not_do_the_same_work(bench):
    peers = bench["peers"]
    same = [run_row("torchrun", 0, 1.0, 1.0), run_row("trl", 0, 1.0, 1.0, loss_step_1=7.2504)]
    assert peers.checks(same)["same_tokens_per_step"] and peers.checks(same)["loss_step_1_ok"]
    other_tokens = [run_row("torchrun", 0, 1.0, 1.0), run_row("trl", 0, 1.0, 1.0, tokens_per_step=[868, 879])]
    assert not peers.checks(other_tokens)["same_tokens_per_step"]
    other_loss = [run_row("torchrun", 0, 1.0, 1.0), run_row("trl", 0, 1.0, 1.0, loss_step_1=7.3)]
    assert not peers.checks(other_loss)["loss_step_1_ok"]


def test_round_order_alternates(bench):
    assert bench["peers"].round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert bench["peers"].round_order(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_targets_say_which_were_met(bench, result):
    met = {t["target"]: t["met"] for t in bench["report"].targets(result)}
    assert met["tunefleet ddp tokens/s >= 0.95x the hand-written loop's"] is True  # 100 / 100
    assert met["tunefleet ddp tokens/s >= 1.0x TRL + Accelerate's"] is True  # 100 / 70
    assert met["tunefleet ddp time to first step < TRL + Accelerate's"] is False  # 30 s against 25 s
    assert met["MFU reported for every row"] is True


def test_page_has_every_row_the_targets_and_relative_image_links(bench, result, tmp_path):
    report = bench["report"]
    images = {"tokens_per_s": "benchmarks/peers_tokens_per_s.png", "first_step_s": "benchmarks/peers_first_step.png",
              "tokens_per_rank_cpu_s": "benchmarks/peers_tokens_per_cpu_s.png"}
    page = report.render(result, images, [{"file": "benchmarks/peers.json", "date": "d", "command": "c"}])
    table = [line for line in page.splitlines() if line.startswith("| tunefleet ddp |")]
    assert len(table) == 2  # wall clock, then per CPU-second
    assert "| 100.0 | 100, 90, 120 | 1.000 | 1.429 |" in table[0]
    assert "| 30.0 | 2,048 | 600.0 | 10.0% | 84.0% |" in table[0]
    # Per CPU-second: 110 tokens per rank CPU-s x 3e8 FLOPs per token / 30e9 peak = 110%.
    assert "| tunefleet ddp | 1.90 | 110.0 | 1.000 | 1.429 | 110.0% |" in page
    assert "| TRL SFTTrainer + Accelerate | 70.0 | 80, 70, 60, n/a |" in page
    assert "| tunefleet ddp time to first step < TRL + Accelerate's | 1.20x | **no** |" in page
    assert "![steady-state tokens/s per system, median and every round](benchmarks/peers_tokens_per_s.png)" in page
    assert "## Strategies at 2 workers" in page  # the hand-written sections are kept
    assert "[`benchmarks/peers.json`](benchmarks/peers.json)" in page


def test_plots_are_written_as_png(bench, result, tmp_path):
    written = bench["report"].plot(result, tmp_path / "benchmarks")
    assert written == {"tokens_per_s": "benchmarks/peers_tokens_per_s.png",
                       "tokens_per_rank_cpu_s": "benchmarks/peers_tokens_per_cpu_s.png",
                       "first_step_s": "benchmarks/peers_first_step.png"}
    for path in written.values():
        assert (tmp_path / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmarks_refuse_a_busy_machine_unless_told(bench, monkeypatch, capsys):
    harness = bench["harness"]
    cores = harness.os.cpu_count()
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (cores * 0.9, 0.0, 0.0))
    with pytest.raises(harness.MachineBusy, match="busy: 1-minute load average"):
        harness.require_quiet()
    assert harness.require_quiet(allow_busy=True)["quiet"] is False
    assert "WARNING: the machine is busy" in capsys.readouterr().err
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (cores * 0.1, 0.0, 0.0))
    assert harness.require_quiet()["quiet"] is True


def floor_result(floor_to_fn_s: float) -> dict:
    """A made-up `ray_train_floor.py` result: medians as the script writes them."""
    floor = {"to_train_fn_s": floor_to_fn_s, "part_python_and_import_ray": 0.3, "part_ray_start": 3.0,
             "part_import_ray_train": 1.8, "part_worker_group_start": floor_to_fn_s - 5.1}
    tunefleet = {"to_train_fn_s": 19.0, "to_first_step_end_s": 20.7, "part_python_imports_and_checks": 3.4,
                 "part_ray_start": 3.1, "part_job_preparation": 0.5, "part_worker_group_start": 11.3}
    return {"command": "python benchmarks/ray_train_floor.py --rounds 3", "runs": [{}] * 6,
            "machine": {"start": {"load_avg_1m": 0.4, "cores": 2}},
            "medians": {"ray-train floor": floor, "tunefleet": tunefleet}}


def test_the_ray_train_floor_section_says_whether_trl_is_within_reach(bench, result):
    """The section's verdict follows the figures: out of reach only when the bare floor is above TRL's first step
    (25 s in ``result``, here the quiet-machine result)."""
    report = bench["report"]
    quiet = {**result, "machine": {**result["machine"], "start": {"load_avg_1m": 0.4, "cores": 2},
                                   "load_avg_end": [1.0, 0.8, 0.6]}}
    slow = report.render(None, {}, [], quiet=quiet, ray_floor=floor_result(26.0))
    assert "| **spawn to the training function** | **26.0** | **19.0** |" in slow
    assert "| model load, strategy, step 1 | | 1.7 |" in slow
    assert "TRL's whole time to the end of step 1 was 25.0 s" in slow and "out of reach" in slow
    fast = report.render(None, {}, [], quiet=quiet, ray_floor=floor_result(14.7))
    assert "| **spawn to the training function** | **14.7** | **19.0** |" in fast
    assert "out of reach" not in fast


def test_rounds_alternate_the_order_of_the_sides(bench):
    assert list(bench["harness"].alternating(3, ("a", "b"))) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"),
                                                                 (2, "b")]
