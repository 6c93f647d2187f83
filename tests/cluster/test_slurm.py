"""Slurm backend: the rendered sbatch script (pure, fast), then real jobs on a
real Slurm (munged, slurmctld, slurmd started by the fixtures): a run to
completion, USR1 -> checkpoint -> requeue -> resume, cancel, and two hosts in
network namespaces with one Ray node each."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import tests.conftest as root
from tests.cluster.conftest import (
    TINY,
    cli,
    job_log,
    job_processes,
    submit,
    tiny_overrides,
    train_steps,
    wait_for_state,
    wait_for_steps,
)
from tests.conftest import REPO
from tunefleet.cluster.backend import ClusterError, parse_job_ref
from tunefleet.cluster.slurm import cancel, parse_scontrol, render_sbatch, status
from tunefleet.launcher.config import SlurmConfig, load_recipe
from tunefleet.launcher.errors import RecipeError, UserError
from tunefleet.launcher.run.submit import backend_options
from tunefleet.launcher.run.submit import submit as submit_command

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}


def render(output_dir: Path, *sets: str, recipe: str | Path = REPO / TINY, flags: dict | None = None,
           **slurm) -> str:
    """The script for the tiny recipe with `--set` overrides, `cluster.slurm` keys and command-line flags.
    `output_dir` is set on the loaded recipe, so that it can hold what a `--set` value's YAML cannot."""
    loaded = load_recipe(recipe, list(sets))
    update: dict = {"output_dir": str(output_dir)}
    if slurm:
        update["cluster"] = loaded.cluster.model_copy(update={"slurm": SlurmConfig(**slurm)})
    loaded = loaded.model_copy(update=update)
    return render_sbatch(loaded, str(recipe), list(sets), backend_options(loaded, "slurm", flags or {}))


def directives(script: str) -> list[str]:
    """`#SBATCH` arguments as sbatch 22.05 reads them: quotes group, a backslash escapes the next
    character, an unquoted `#` ends the line (checked against the real sbatch in an e2e test below)."""
    args = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH "):
            continue
        text, arg, quote, escape = line[len("#SBATCH "):].strip(), "", None, False
        for char in text:
            if escape:
                arg, escape = arg + char, False
            elif char == "\\":
                escape = True
            elif quote:
                quote = None if char == quote else quote
                arg += char if quote else ""
            elif char in "\"'":
                quote = char
            elif char == "#" or char.isspace():
                break
            else:
                arg += char
        args.append(arg)
    return args


def shell_values(script: str) -> list[str]:
    """Run the script's values block in bash and read the variables back."""
    block = script.split("# ---- values\n", 1)[1].split("# ---- end of values\n", 1)[0]
    probe = block + 'printf "%s\\0" "$RECIPE" "$OUTPUT_DIR" "$BIN_DIR" "${LAUNCH_ARGS[@]}"\n'
    result = subprocess.run(["bash", "-c", probe], capture_output=True, check=True)
    return result.stdout.decode().split("\0")[:-1]


def bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- rendering
def test_layout_resources_requeue_and_signal(tmp_path):
    script = render(tmp_path / "run", "parallelism.num_nodes=3", "parallelism.workers_per_node=2",
                    "parallelism.cpus_per_worker=3", "parallelism.use_gpu=true",
                    "fault_tolerance.preemption_grace_s=100")
    bash_syntax_ok(script)
    args = directives(script)
    for expected in ("--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=6", "--gpus-per-node=2", "--requeue",
                     "--signal=B:USR1@130", f"--output={tmp_path}/run/slurm-%j.out", "--open-mode=append",
                     "--job-name=tiny-llama-full-ddp", "--export=ALL,WANDB_API_KEY,HF_TOKEN"):
        assert expected in args, (expected, args)
    assert "NUM_NODES=3" in script and "CPUS_PER_NODE=6" in script and "GPUS_PER_NODE=2" in script


def test_recipe_settings_and_command_line_flags(tmp_path):
    script = render(tmp_path / "run", flags={"partition": "gpu-long", "time": "2:00:00"}, partition="cpu",
                    account="proj1", cpus_per_node=8, requeue=False, signal_grace_s=600,
                    extra_sbatch=["--qos=high", "--constraint=a100|h100"], setup=["module load cuda/12"])
    args = directives(script)
    for expected in ("--partition=gpu-long", "--time=2:00:00", "--account=proj1", "--cpus-per-task=8",
                     "--no-requeue", "--signal=B:USR1@600", "--qos=high", "--constraint=a100|h100"):
        assert expected in args, (expected, args)
    assert "--requeue" not in args and "\nmodule load cuda/12\n" in script and "REQUEUE=0" in script
    bash_syntax_ok(script)


def test_hostile_values_come_out_literally(tmp_path):
    hostile = f"$(touch {tmp_path}/pwned) `touch {tmp_path}/pwned` 'q' \"dq\" #h ;&|<>"
    folder = tmp_path / f"recipes {hostile}"
    shutil.copytree(REPO / "recipes" / "tiny", folder)
    recipe = folder / "llama-full-ddp.yaml"
    name = f"{hostile}\nnext line"
    name_override = "logging.wandb.name='" + name.replace("'", "''") + "'"  # a YAML string, newline and all
    script = render(tmp_path / hostile / "run", name_override, recipe=recipe, partition=hostile, account=hostile,
                    bin_dir=f"/opt/{hostile}/bin")
    bash_syntax_ok(script)
    recipe_path, output_dir, bin_dir, *launch_args = shell_values(script)
    assert recipe_path == str(recipe) and output_dir == str(tmp_path / hostile / "run")
    assert bin_dir == f"/opt/{hostile}/bin"
    assert launch_args == ["--set", name_override]
    args = directives(script)
    assert f"--partition={hostile}" in args and f"--account={hostile}" in args
    assert f"--output={tmp_path / hostile}/run/slurm-%j.out" in args
    assert not (tmp_path / "pwned").exists()


def test_values_an_sbatch_line_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ClusterError, match="newline or control character"):
        render(tmp_path / "a\nb")
    with pytest.raises(ClusterError, match="file name pattern"):
        render(tmp_path / "100%")
    with pytest.raises(RecipeError, match="--partition"):
        render(tmp_path / "run", flags={"partition": "a\n#SBATCH --uid=0"})
    with pytest.raises(RecipeError, match="quote the time limit"):
        render(tmp_path / "run", "cluster.slurm.time=1:00:00")  # YAML 1.1 reads it as 3600 seconds
    with pytest.raises(UserError, match="--namespace does not apply"):
        render(tmp_path / "run", flags={"namespace": "x"})


def test_secrets_are_passed_by_name_only(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-value-123")
    script = render(tmp_path / "run", export_env=["WANDB_API_KEY", "MY_TOKEN"])
    assert "sekrit-value-123" not in script
    assert "--export=ALL,WANDB_API_KEY,MY_TOKEN" in directives(script)
    only_named = render(tmp_path / "run", export_env=["WANDB_API_KEY"], export_all=False)
    assert "--export=WANDB_API_KEY" in directives(only_named)
    with pytest.raises(ValueError, match="never values"):
        SlurmConfig(export_env=["WANDB_API_KEY=sekrit-value-123"])


def test_impossible_resources_name_the_key(tmp_path):
    with pytest.raises(ClusterError, match="cluster.slurm.cpus_per_node"):
        render(tmp_path / "run", cpus_per_node=1)  # the tiny recipe runs 2 workers x 1 CPU per node
    with pytest.raises(ClusterError, match="cluster.slurm.gpus_per_node"):
        render(tmp_path / "run", "parallelism.use_gpu=true", gpus_per_node=1)
    with pytest.raises(ClusterError, match="preemption_grace_s"):
        render(tmp_path / "run", signal_grace_s=60)


def test_overrides_reach_the_launch_command_unchanged(tmp_path):
    sets = [f"output_dir={tmp_path / 'run'}", "train.max_steps=8", "train.warmup_steps=2", "train.lr=1e-4"]
    loaded = load_recipe(REPO / TINY, sets)
    script = render_sbatch(loaded, TINY, sets, backend_options(loaded, "slurm", {}))
    recipe_path, _, _, *launch_args = shell_values(script)
    assert recipe_path == str(REPO / TINY)  # absolute: the job does not depend on where it starts
    assert launch_args == [part for item in sets for part in ("--set", item)]
    assert '"$BIN_DIR/tunefleet" launch "$RECIPE" --address "$ADDRESS" "${LAUNCH_ARGS[@]}"' in script


def test_dry_run_through_the_cli_prints_the_script(tmp_path):
    from tests.conftest import tunefleet

    out = tmp_path / "run"
    result = tunefleet("submit", TINY, "--to", "slurm", "--dry-run", "--partition", "debug",
                       *tiny_overrides(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "#SBATCH --partition=debug" in result.stdout
    bash_syntax_ok(result.stdout)
    assert not out.exists()  # a dry run writes nothing
    with pytest.raises(UserError, match="--to nowhere"):
        submit_command(REPO / TINY, to="nowhere")


def test_job_references_and_scontrol_parsing():
    assert parse_job_ref("slurm:42") == ("slurm", "42") and parse_job_ref("42") == ("slurm", "42")
    with pytest.raises(ClusterError, match="not understood"):
        parse_job_ref("nowhere:1")
    with pytest.raises(ClusterError, match="not a Slurm job id"):
        status("42; rm -rf /")
    line = ("JobId=7 JobName=run JobState=RUNNING Reason=None Restarts=1 NodeList=h[1-2] "
            "StdOut=/tmp/a b/c 'q'/slurm-7.out StdErr=/tmp/x Power=")
    fields = parse_scontrol(line)
    assert fields["StdOut"] == "/tmp/a b/c 'q'/slurm-7.out" and fields["NodeList"] == "h[1-2]"
    assert fields["Restarts"] == "1" and fields["Power"] == ""


# --------------------------------------------------------------------------- real Slurm
@pytest.mark.e2e
def test_sbatch_reads_hostile_values_literally(slurm, tmp_path):
    hostile = "$(touch pwned) 'q' \"dq\" #h"
    script = render(tmp_path / hostile / "run", account=hostile)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    job = slurm.run("sbatch", "--parsable", "--hold", str(path)).stdout.strip()
    fields = slurm.job_fields(job)
    slurm.run("scancel", job)
    assert fields["StdOut"] == f"{tmp_path / hostile}/run/slurm-{job}.out"
    assert fields["Account"] == hostile


@pytest.mark.e2e
def test_tiny_recipe_runs_to_completion(slurm, tmp_path):
    out = tmp_path / "run"
    job = submit(slurm, *tiny_overrides(out))
    follow = subprocess.Popen([str(root.BIN / "tunefleet"), "logs", job, "--follow"], env=slurm.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shown = cli(slurm, "status", f"slurm:{job}")  # while it runs
    assert shown.returncode == 0 and re.search(r"state: (PENDING|RUNNING)", shown.stdout), shown.stderr
    fields = wait_for_state(slurm, job, DONE, timeout_s=420)
    log = job_log(fields)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log[-5000:]
    assert train_steps(out) == list(range(1, 9)) and (out / "final" / "model.safetensors").is_file()
    assert "all 1 Ray node(s) joined" in log and "tunefleet launch exited with 0" in log
    assert not job_processes(job) and not list(Path("/tmp").glob(f"tf-ray-{job}-*"))
    assert not list((out / ".slurm").glob("ray-token-*"))
    followed, errors = follow.communicate(timeout=60)  # --follow ends by itself once the job has
    assert follow.returncode == 0 and followed == log, errors


@pytest.mark.e2e
def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    out = tmp_path / "preempted"
    stall = {"TUNEFLEET_FAULT": "rank=0,step=6,kind=stall,seconds=10"}  # holds the run at step 6 (first run only)
    job = submit(slurm, *tiny_overrides(out, max_steps=16), env=stall)
    wait_for_steps(out, 5)
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # what Slurm sends --signal's grace before the limit
    fields = wait_for_state(slurm, job, DONE, timeout_s=420,
                            until=lambda f: f["JobState"] != "COMPLETED" or int(f["Restarts"]) >= 1)
    log = job_log(fields)
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1"), log[-6000:]
    saved = int(re.search(r"checkpoint saved at step (\d+)", log).group(1))
    assert 6 <= saved < 16 and "tunefleet launch exited with 75" in log and "requeueing job" in log
    assert "(restart 1)" in log and "resuming from" in log and f"step_{saved}" in log.split("(restart 1)")[1]
    assert sorted(set(train_steps(out))) == list(range(1, 17))


@pytest.mark.e2e
def test_cancel_stops_the_job_and_its_ray(slurm, tmp_path, monkeypatch):
    out = tmp_path / "cancelled"
    job = submit(slurm, *tiny_overrides(out, max_steps=2000))
    wait_for_state(slurm, job, {"RUNNING"}, until=lambda f: "Ray node(s) joined" in job_log(f))
    assert job_processes(job)
    result = cli(slurm, "cancel", job)
    assert result.returncode == 0 and f"cancelled slurm:{job} (was RUNNING)" in result.stdout, result.stderr
    wait_for_state(slurm, job, {"CANCELLED"}, timeout_s=60)
    deadline = time.time() + 60
    while (job_processes(job) or list(Path("/tmp").glob(f"tf-ray-{job}-*"))) and time.time() < deadline:
        time.sleep(1)
    assert not job_processes(job) and not list(Path("/tmp").glob(f"tf-ray-{job}-*"))
    assert "TERM: stopping" in job_log(slurm.job_fields(job))
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    again = cancel(job)  # in-process: the command's own words were checked above
    assert again.finished and again.state == "CANCELLED"


@pytest.mark.e2e
def test_two_hosts_run_one_ray_node_each(slurm_two_hosts, tmp_path):
    out = tmp_path / "two-hosts"
    job = submit(slurm_two_hosts, *tiny_overrides(out), "--set=parallelism.num_nodes=2",
                 "--set=parallelism.workers_per_node=1")
    fields = wait_for_state(slurm_two_hosts, job, DONE, timeout_s=420)
    log = job_log(fields)
    assert (fields["JobState"], fields["NodeList"]) == ("COMPLETED", "h[1-2]"), log[-6000:]
    assert "all 2 Ray node(s) joined" in log
    assert train_steps(out) == list(range(1, 9))
    # Ray's worker output (prefixed with the node's address) is in the run folder's launch.log
    ray_output = (out / "launch.log").read_text()
    assert {"10.213.0.1", "10.213.0.2"} <= set(re.findall(r"ip=(10\.213\.0\.\d)", ray_output))


def test_secrets_reach_the_job_by_inherited_environment_never_the_script(tmp_path, monkeypatch):
    planted = {"HF_TOKEN": "hf-planted-2c81", "WANDB_API_KEY": "wandb-planted-77d0"}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    script = render(tmp_path, export_env=["HF_TOKEN", "WANDB_API_KEY"])
    assert not [name for name, value in planted.items() if value in script]
    assert any("--export=" in line and "HF_TOKEN" in line and "WANDB_API_KEY" in line for line in directives(script))
