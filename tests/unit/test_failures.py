"""How a worker's death is named: the Ray report of each failed rank read with the files the rank left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

from tunefleet.launcher.training import failures

ACTOR_DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n"
              "\tactor_id: 8fe6\n\tpid: 4242\n\tip: 10.0.0.7\nThe actor is dead because its worker process has "
              "died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a "
              "connection error code 2. End of file.")


class HealthCheckFailed(Exception):
    """Shaped like Ray Train's WorkerHealthCheckFailedError: the actor's death is its cause."""

    def __init__(self, cause: str):
        super().__init__("Worker health check failed.")
        self.health_check_failure = cause


def write_identity(tmp_path, rank=1, oom_kills=3, host=None, pid=4242, node_id="ab", rendezvous="10.0.0.7:29500"):
    folder = tmp_path / failures.WORKERS_DIR
    folder.mkdir(exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "pid": pid, "host": host or socket.gethostname(), "node_ip": "10.0.0.7",
         "node_id": node_id, "oom_kills": oom_kills, "rendezvous": rendezvous}))
    return folder


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def oom_file(tmp_path, count: int):
    path = tmp_path / "memory.events"
    path.write_text(f"low 0\nhigh 0\nmax 12\noom 2\noom_kill {count}\n")
    return (path,)


def test_a_kill_without_trace_is_named_as_sigkill(tmp_path):
    write_identity(tmp_path)
    found = failures.describe(1, HealthCheckFailed(ACTOR_DIED), str(tmp_path), oom_files=oom_file(tmp_path, 3))
    assert found.died and "SIGKILL" in found.how
    assert found.line().startswith("rank 1 on node 10.0.0.7 (id ab, pid 4242) was killed without a Python error")


def test_a_rise_of_the_cgroup_oom_kill_count_names_the_kernel_oom_killer(tmp_path):
    write_identity(tmp_path, oom_kills=3)
    found = failures.describe(1, HealthCheckFailed(ACTOR_DIED), str(tmp_path), oom_files=oom_file(tmp_path, 4))
    assert "kernel OOM killer" in found.how
    # on another host the count is not this rank's: no claim
    write_identity(tmp_path, oom_kills=3, host="elsewhere")
    other = failures.describe(1, HealthCheckFailed(ACTOR_DIED), str(tmp_path), oom_files=oom_file(tmp_path, 4))
    assert "OOM" not in other.how


def test_cgroup_v1_oom_control_is_read_too(tmp_path):
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    assert failures.kernel_oom_kills((tmp_path / "missing", v1)) == 7
    assert failures.kernel_oom_kills((tmp_path / "missing",)) is None


def test_rays_memory_monitor_and_a_lost_node_are_named(tmp_path):
    monitor = ACTOR_DIED + "\nTask was killed due to the node running low on memory. (OutOfMemoryError)"
    assert "memory monitor" in failures.describe(0, monitor, str(tmp_path)).how
    lost = ACTOR_DIED.replace("its worker process has died", "its node has died")
    assert failures.describe(0, lost, str(tmp_path)).how == "was lost with its node"


def test_a_python_error_is_named_by_its_last_exception_line_and_sys_exit_by_its_code(tmp_path):
    write_identity(tmp_path, rank=0)
    report = "Traceback (most recent call last):\n  File \"x.py\", line 3\nValueError: bad batch at row 7\n"
    found = failures.describe(0, RuntimeError(report), str(tmp_path))
    assert not found.died
    assert found.line() == "rank 0 on node 10.0.0.7 (id ab, pid 4242) raised ValueError: bad batch at row 7"
    assert failures.describe(0, "Traceback\nSystemExit: 3", str(tmp_path)).how == "exited with code 3"
    # Ray Train hands over the worker's own exception object: its type names it
    assert failures.describe(0, KeyError("labels"), str(tmp_path)).how == "raised KeyError: 'labels'"


def test_a_real_segfault_and_a_real_sigterm_leave_their_reports(tmp_path):
    """A child process arms the reports as a worker does, then dies by the signal."""
    for signum, expected in ((signal.SIGSEGV, "crashed: SIGSEGV (segmentation fault)"),
                             (signal.SIGTERM, "received SIGTERM")):
        code = ("import os, signal\nfrom tunefleet.launcher.training import failures\n"
                f"failures.watch({str(tmp_path)!r}, 2, node_ip='10.0.0.9', node_id='cd')\n"
                f"os.kill(os.getpid(), {int(signum)})\nimport time; time.sleep(10)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        assert proc.returncode == -signum, proc.stderr  # the signal still ends the process (chained)
        found = failures.describe(2, HealthCheckFailed(ACTOR_DIED), str(tmp_path))
        assert expected in found.how and found.died, found
        assert "10.0.0.9" in found.where and str(os.getpid()) not in found.where


def test_one_line_for_a_group_names_the_dead_rank_first_and_counts_the_rest(tmp_path):
    dead = failures.Failure(1, "node a (pid 1)", "was killed", died=True)
    broken = failures.Failure(0, "node b (pid 2)", "raised RuntimeError: Connection closed by peer", died=False)
    other = failures.Failure(2, "node b (pid 3)", "raised RuntimeError: Connection closed by peer", died=False)
    assert failures.summary([broken, dead, other]) == "rank 1 on node a (pid 1) was killed; ranks 0, 2 stopped with it"
    assert failures.summary([broken]) == "rank 0 on node b (pid 2) raised RuntimeError: Connection closed by peer"


def test_a_traceless_death_on_a_node_the_cluster_lost_is_named_as_the_node(tmp_path):
    write_identity(tmp_path)
    asked = []
    found = failures.describe(1, HealthCheckFailed(ACTOR_DIED), str(tmp_path), oom_files=oom_file(tmp_path, 3),
                              lost_nodes=lambda nodes: asked.append(nodes) or nodes)
    assert asked == [{"ab"}] and found.how == "was lost with its node"


PEER_CLOSED = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:52939")


def test_a_rank_that_only_lost_its_peer_is_not_named_as_the_cause_when_the_peer_is_gone(tmp_path):
    """Rank 1 is killed; rank 0's collective fails first, before Ray has noticed rank 1's death (seen in CI:
    the report named rank 0's 'Connection closed by peer' and not the lost node)."""
    write_identity(tmp_path, rank=0, pid=os.getpid(), node_id="n0")
    write_identity(tmp_path, rank=1, pid=4242, node_id="n1", host="elsewhere")
    write_identity(tmp_path, rank=2, pid=os.getpid(), node_id="n0", rendezvous="10.0.0.7:1111")  # earlier attempt
    asked = []
    found = failures.describe_all({0: PEER_CLOSED}, str(tmp_path),
                                  lost_nodes=lambda nodes: asked.append(nodes) or {"n1"} & nodes)
    assert asked == [{"n1"}]  # only this attempt's silent rank, on another host: its node is asked about
    assert failures.summary(found) == ("rank 1 on node 10.0.0.7 (id n1, pid 4242) was lost with its node; "
                                       "rank 0 stopped with it")


def test_a_silent_peer_whose_process_is_gone_on_this_host_is_named_by_its_evidence(tmp_path):
    pid = dead_pid()
    folder = write_identity(tmp_path, rank=1, pid=pid, node_id="n0")
    write_identity(tmp_path, rank=0, pid=os.getpid(), node_id="n0")
    (folder / f"rank1-{pid}.crash").write_text("Fatal Python error: Segmentation fault\n")
    found = failures.describe_all({0: PEER_CLOSED}, str(tmp_path), lost_nodes=lambda nodes: set())
    assert [(f.rank, f.died) for f in found] == [(0, False), (1, True)]
    assert found[1].how == "crashed: SIGSEGV (segmentation fault)"


def test_no_peer_is_blamed_when_every_peer_is_alive_or_the_error_is_not_a_lost_peer(tmp_path):
    write_identity(tmp_path, rank=0, pid=os.getpid(), node_id="n0")
    write_identity(tmp_path, rank=1, pid=os.getpid(), node_id="n1")
    alive = failures.describe_all({0: PEER_CLOSED}, str(tmp_path), lost_nodes=lambda nodes: set())
    assert [f.rank for f in alive] == [0] and "Connection closed by peer" in alive[0].how
    write_identity(tmp_path, rank=1, pid=dead_pid(), node_id="n1")
    asked = []
    own = failures.describe_all({0: ValueError("bad batch")}, str(tmp_path),
                                lost_nodes=lambda nodes: asked.append(nodes) or nodes)
    assert [f.rank for f in own] == [0] and asked == []  # rank 0's own error: nobody else is looked for
    echo = failures.describe_all({0: ValueError("bad batch"), 2: PEER_CLOSED}, str(tmp_path),
                                 lost_nodes=lambda nodes: asked.append(nodes) or nodes)
    assert [f.rank for f in echo] == [0, 2] and asked == []  # nor when one rank's own error broke the rest


def test_a_node_is_waited_on_once_however_many_of_its_ranks_died_without_a_trace(tmp_path):
    """Asking whether a living node is lost waits (5 s in a launch); three ranks SIGKILLed on it wait once."""
    for rank in range(3):
        write_identity(tmp_path, rank=rank, pid=4242 + rank, node_id="n0", host="elsewhere")
    asked = []
    found = failures.describe_all({rank: HealthCheckFailed(ACTOR_DIED) for rank in range(3)}, str(tmp_path),
                                  lost_nodes=lambda nodes: asked.append(nodes) or set())
    assert asked == [{"n0"}]
    assert all(f.died and "SIGKILL" in f.how for f in found) and len(found) == 3
