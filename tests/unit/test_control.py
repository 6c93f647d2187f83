"""Signals on the driver: a first Ctrl-C (like SIGTERM) asks for a checkpoint-and-stop; a
second Ctrl-C leaves at once with 130. Run in a child process that installs the real handlers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

CHILD = """
import sys, time
from tunefleet.launcher.training import control

class Remote:
    def __init__(self, name):
        self.name = name
    def remote(self, *args):
        print(self.name, *args, flush=True)

class Control:
    request_stop = Remote("request_stop")

control.forward_signals_to(Control(), on_signal=lambda signum: print("on_signal", signum, flush=True))
print("ready", flush=True)
time.sleep(60)
sys.exit(3)
"""


def start_child() -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def test_first_ctrl_c_requests_a_stop_and_the_second_exits_130():
    child = start_child()
    child.send_signal(signal.SIGINT)
    assert child.stdout.readline().split() == ["request_stop", "SIGINT"]
    assert child.stdout.readline().split() == ["on_signal", str(int(signal.SIGINT))]
    time.sleep(0.2)
    assert child.poll() is None, "the first Ctrl-C must leave time to checkpoint"
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=10) == 130


def test_sigterm_requests_a_stop_every_time_without_exiting():
    child = start_child()
    for _ in range(2):
        child.send_signal(signal.SIGTERM)
        assert child.stdout.readline().split() == ["request_stop", "SIGTERM"]
        child.stdout.readline()
    assert child.poll() is None
    child.kill()
    child.wait(timeout=10)


def test_the_hub_hands_the_driver_every_event_once_in_order_and_keeps_the_first_stop_reason():
    from tunefleet.launcher.training.control import Hub

    hub = Hub()
    assert hub.take_all() == [] and hub.stop_reason() is None
    for step in (1, 2, 3):
        hub.put({"event": "metrics", "step": step})
    assert [event["step"] for event in hub.take_all()] == [1, 2, 3]
    hub.put({"event": "finish"})
    assert hub.take_all() == [{"event": "finish"}] and hub.take_all() == []
    hub.request_stop("SIGTERM")
    hub.request_stop("SIGINT")
    assert hub.stop_reason() == "SIGTERM"
