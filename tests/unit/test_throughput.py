"""MFU's peak: a datasheet table for GPUs, a matmul probe measured once per machine and cached on CPU."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers

from tunefleet.launcher.model.tiny import tiny_config
from tunefleet.launcher.training import throughput
from tunefleet.launcher.training.throughput import PeakFlops


def test_a_cpu_peak_is_measured_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "machine_is_quiet", lambda num_threads: True)
    first = throughput.cpu_peak(torch.float32, cache_dir=tmp_path)
    (cached,) = (tmp_path / "peak-flops").glob("cpu-*.json")
    assert first.source == f"measured once on this machine (cached at {cached})"
    assert json.loads(cached.read_text())["flops"] == first.flops > 0

    # A later launch on a busy machine would measure a lower peak (and an MFU above 1): it reads the cache instead.
    monkeypatch.setattr(throughput, "cpu_peak_flops", lambda *args, **kwargs: first.flops / 2)
    assert throughput.cpu_peak(torch.float32, cache_dir=tmp_path) == first


def test_a_peak_measured_on_a_busy_machine_is_replaced_at_the_next_quiet_launch(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "QUIET_WAIT_S", 0.0)
    monkeypatch.setattr(throughput, "machine_is_quiet", lambda num_threads: False)
    monkeypatch.setattr(throughput, "cpu_peak_flops", lambda *args, **kwargs: 1e9)
    busy = throughput.cpu_peak(torch.float32, cache_dir=tmp_path)
    assert busy.flops == 1e9 and "while it was busy" in busy.source
    assert throughput.cpu_peak(torch.float32, cache_dir=tmp_path) == busy  # still busy: the same figure

    monkeypatch.setattr(throughput, "machine_is_quiet", lambda num_threads: True)
    monkeypatch.setattr(throughput, "cpu_peak_flops", lambda *args, **kwargs: 3e9)
    quiet = throughput.cpu_peak(torch.float32, cache_dir=tmp_path)
    assert quiet.flops == 3e9 and quiet.source.startswith("measured once on this machine (cached at")


def test_the_peak_is_measured_in_the_training_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "machine_is_quiet", lambda num_threads: True)
    monkeypatch.setattr(throughput, "cpu_peak_flops", lambda size=0, repeats=0, dtype=torch.float32: dtype.itemsize)
    fp32 = throughput.device_peak(torch.device("cpu"), "no", cache_dir=tmp_path)
    bf16 = throughput.device_peak(torch.device("cpu"), "bf16", cache_dir=tmp_path)
    assert (fp32.flops, bf16.flops) == (4, 2)  # bf16 autocast on a CPU with AMX runs far above the fp32 peak


def test_a_gpu_peak_comes_from_the_datasheet_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = throughput.device_peak(torch.device("cuda", 0), "bf16")
    assert peak == PeakFlops(989e12, "table: NVIDIA H100 80GB HBM3 (dense bf16)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Unknown 7")
    assert throughput.device_peak(torch.device("cuda", 0), "bf16") is None


def test_the_peak_and_how_it_was_chosen_are_written_to_the_run_folder(tmp_path):
    throughput.record_peak(tmp_path, PeakFlops(989e12, "table: NVIDIA H100 80GB HBM3 (dense bf16)"))
    recorded = json.loads((tmp_path / throughput.MFU_FILE).read_text())
    assert recorded["peak_flops"] == {"flops": 989e12, "source": "table: NVIDIA H100 80GB HBM3 (dense bf16)"}
    assert "step_time_s" in recorded["mfu"]


def test_mfu_of_real_cpu_steps_is_in_0_1(tmp_path, monkeypatch):
    """Forward and backward of the tiny Llama the CPU recipes train, timed like the loop times a step."""
    monkeypatch.setattr(throughput, "QUIET_WAIT_S", 0.0)  # a test machine is rarely quiet; measure at once
    torch.manual_seed(0)
    config = tiny_config("llama")
    model = transformers.LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    batch = torch.randint(0, config.vocab_size, (4, 128))
    flops_per_step = throughput.flops_per_token(config, num_params, num_params, seq_len=128) * batch.numel()
    peak = throughput.cpu_peak(torch.float32, cache_dir=tmp_path)
    model(batch, labels=batch).loss.backward()  # warm-up
    for _ in range(3):
        started = time.perf_counter()
        model(batch, labels=batch).loss.backward()
        step_time_s = time.perf_counter() - started
        assert 0 < throughput.mfu(flops_per_step, step_time_s, peak, world_size=1) <= 1, (step_time_s, peak)


def test_an_mfu_above_1_is_reported_as_is_with_a_warning_naming_the_peak():
    peak = PeakFlops(1e9, "measured once on this machine while it was busy (cached at /x.json)")
    with pytest.warns(UserWarning, match=r"peak 1e\+09 FLOP/s .*cached at /x.json"):
        assert throughput.mfu(4e9, 1.0, peak, world_size=2) == 2.0
    assert throughput.mfu(4e9, 1.0, None, world_size=2) is None
