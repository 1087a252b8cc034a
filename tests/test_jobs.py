"""Cluster jobs (trainer.jobs): the job folder for each scheduler, SkyPilot's own validator, bad input,
the node-side exit record, and two "nodes" on this machine training from the generated commands.

The two-node test runs the torchrun job's launch_node.sh twice, as machine ranks 0 and 1 with
MAIN_IP=127.0.0.1 (gloo on the CPU): `accelerate launch --num_machines 2 --machine_rank 0/1
--main_process_ip 127.0.0.1`, one process each. Its losses equal a local `tunewise train` with
two processes on one machine and the same seed, step by step. Slurm for real is in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import free_port

from advisor import cluster, memory, specs
from advisor.errors import TunewiseError
from advisor.plan import Plan
from trainer import jobs, supervisor
from trainer.events import read_all_events

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / "cli.py")


def tunewise(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CLI, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=120,
                          env=env)


def gpu_plan(**hardware) -> Plan:
    return Plan.from_dict({"model": {"name": "llama-2-7b"}, "method": {"method": "full", "precision": "amp"},
                           "hardware": {"gpu": "H100-80GB", "shard": "zero3", **hardware}})


def demo_plan(steps: int, **training) -> Plan:
    return Plan.from_dict({
        "model": {"name": "demo"},
        "data": {"dataset": "demo-sft", "eval_fraction": 0.0},
        "training": {"max_steps": steps, "seq_len": 128, "micro_batch": 4, "logging_steps": 1, "seed": 7, **training},
        "forgetting": {"monitor": False},
        "hardware": {"device": "cpu"},
    })


def test_a_slurm_job_folder_holds_the_plan_the_config_and_the_batch_script(tmp_path):
    runs = tmp_path / "shared" / "runs"
    job = jobs.write_job(gpu_plan(), "slurm", runs, nodes=2, gpus_per_node=8, partition="gpu", time_limit="12:00:00")
    job_dir, run_dir = Path(job.job_dir), Path(job.run_dir)
    assert job_dir == run_dir / "job" and run_dir.parent == runs.resolve()
    assert sorted(p.name for p in job_dir.iterdir()) == sorted(job.files) == sorted(
        ["plan.yaml", "accelerate_config.yaml", "launch_node.sh", "job.sbatch", "job.json", "README.md"])
    plan = Plan.load(job_dir / "plan.yaml")
    assert (plan.hardware.num_nodes, plan.hardware.num_gpus) == (2, 8)
    assert Plan.load(run_dir / "plan.yaml") == plan
    config = yaml.safe_load((job_dir / "accelerate_config.yaml").read_text())
    assert (config["distributed_type"], config["fsdp_config"]["fsdp_sharding_strategy"]) == ("FSDP", "FULL_SHARD")
    assert (config["num_machines"], config["num_processes"], config["main_process_port"]) == (2, 16, 29500)
    sbatch = (job_dir / "job.sbatch").read_text()
    host = cluster.host_memory(specs.resolve_model("llama-2-7b"), memory.setup_from_plan(plan))[0]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 f"#SBATCH --mem={-(-host // 2**20)}M", "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00",
                 f"#SBATCH --output={run_dir}/stdout.log", 'srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash'):
        assert line in sbatch, line
    node = (job_dir / "launch_node.sh").read_text()
    assert "--num_machines 2 --num_processes 16" in node and "--main_process_port 29500" in node
    assert os.access(job_dir / "launch_node.sh", os.X_OK)
    for script in ("job.sbatch", "launch_node.sh"):  # bash itself parses them
        parsed = subprocess.run(["bash", "-n", str(job_dir / script)], capture_output=True, text=True)
        assert parsed.returncode == 0, parsed.stderr
    assert job.submit_command == ("sbatch", str(job_dir / "job.sbatch"))
    assert "scancel" in (job_dir / "README.md").read_text()
    # The run is there before the job runs: queued, named as a Slurm job.
    status = supervisor.status(job.run_id, runs)
    assert (status.state, status.scheduler, status.job_id) == ("queued", "slurm", None)


def test_plan_text_cannot_break_out_of_the_scripts_comments(tmp_path):
    plan = gpu_plan().with_overrides({"data.dataset": "data.jsonl\necho escaped > /tmp/tunewise-escaped"})
    job = jobs.write_job(plan, "slurm", tmp_path / "runs", nodes=2, gpus_per_node=8)
    for script in ("job.sbatch", "launch_node.sh"):
        lines = (Path(job.job_dir) / script).read_text().splitlines()
        assert not [line for line in lines if line.startswith("echo escaped")], script
        assert any("data.jsonl echo escaped" in line and line.startswith("#") for line in lines)
    with pytest.raises(TunewiseError, match="--main-ip"):
        jobs.write_job(gpu_plan(), "torchrun", tmp_path / "runs", main_ip="$(reboot)")


def test_the_skypilot_task_is_valid_for_skypilot_itself(tmp_path):
    """sky.Task.from_yaml parses the generated task offline (no cloud). SkyPilot's dependencies clash
    with this project's (click < 8.2 against huggingface-hub's >= 8.4.2), so it lives in its own
    environment: $TUNEWISE_SKYPILOT_PYTHON or .venv-sky/bin/python (.ci/run makes it)."""
    python = os.environ.get("TUNEWISE_SKYPILOT_PYTHON") or str(REPO / ".venv-sky" / "bin" / "python")
    if not Path(python).is_file():
        if os.environ.get("TUNEWISE_REQUIRE_SKYPILOT") == "1":
            pytest.fail(f"no SkyPilot environment at {python}")
        pytest.skip("SkyPilot is not installed (python3 -m venv .venv-sky && .venv-sky/bin/pip install skypilot)")
    job = jobs.write_job(gpu_plan(gpu="A100-80GB"), "skypilot", tmp_path / "runs", nodes=2, gpus_per_node=8,
                         bucket="s3://tunewise-runs")
    task_file = Path(job.job_dir) / "sky.yaml"
    broken = tmp_path / "broken.yaml"
    broken.write_text(task_file.read_text().replace("num_nodes: 2", "num_nodes: 0"))
    probe = (
        "import json, sys, sky\n"
        "task = sky.Task.from_yaml(sys.argv[1])\n"
        "(resources,) = task.resources\n"
        "mounts = {k: str(v) for k, v in (task.file_mounts or {}).items()}\n"
        "stores = {k: [s.value for s in v.stores] for k, v in (task.storage_mounts or {}).items()}\n"
        "print(json.dumps({'num_nodes': task.num_nodes, 'accelerators': resources.accelerators, 'memory': resources.memory,"
        " 'envs': task.envs, 'run': task.run, 'setup': task.setup, 'file_mounts': mounts, 'storage': stores,"
        " 'workdir': task.workdir}))\n"
        "try:\n    sky.Task.from_yaml(sys.argv[2])\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    home = tmp_path / "sky-home"  # SkyPilot keeps its state under ~/.sky
    done = subprocess.run([python, "-c", probe, str(task_file), str(broken)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    first, refusal = done.stdout.strip().splitlines()[-2:]
    task = json.loads(first)
    assert task["num_nodes"] == 2 and task["accelerators"] == {"A100-80GB": 8}
    host = cluster.host_memory(specs.resolve_model("llama-2-7b"), memory.setup_from_plan(Plan.load(Path(job.job_dir) / "plan.yaml")))[0]
    assert task["memory"] == f"{-(-host // 10**9)}+"
    assert task["envs"] == {"TUNEWISE_PYTHON": "python"} and task["workdir"] == str(REPO)
    assert f"bash ~/tunewise-jobs/{job.run_id}/launch_node.sh" in task["run"] and "SKYPILOT_NODE_RANK" in task["run"]
    assert task["setup"].strip() == "pip install -e ."
    assert task["file_mounts"] == {f"~/tunewise-jobs/{job.run_id}": job.job_dir}
    assert list(task["storage"]) == [str(Path(job.run_dir).parent)]  # the bucket is the runs folder on the nodes
    assert refusal.startswith("ValueError") and "num_nodes" in refusal  # SkyPilot's validator is the one at work


def test_a_torchrun_job_lists_one_command_per_node(tmp_path):
    job = jobs.write_job(gpu_plan(), "torchrun", tmp_path / "runs", nodes=3, gpus_per_node=4, main_ip="10.1.2.3", port=29999)
    assert job.node_commands == tuple(f"MACHINE_RANK={rank} MAIN_IP=10.1.2.3 bash {job.job_dir}/launch_node.sh"
                                      for rank in range(3))
    readme = (Path(job.job_dir) / "README.md").read_text()
    assert all(command in readme for command in job.node_commands)
    assert "--num_machines 3 --num_processes 12" in (Path(job.job_dir) / "launch_node.sh").read_text()
    assert job.submit_command == () and not (Path(job.job_dir) / "job.sbatch").exists()


def _bad(tmp_path: Path, *args: str, env: dict | None = None) -> str:
    plan = tmp_path / "plan.yaml"
    if not plan.exists():
        gpu_plan().save(plan)
    done = tunewise("job", str(plan), *args, env=env, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stderr


@pytest.mark.parametrize("args, message", [
    (("--scheduler", "slurm", "--nodes", "0"), "--nodes must be at least 1 (a machine), got 0"),
    (("--scheduler", "slurm", "--nodes", "2", "--gpus-per-node", "9"),
     "9 GPUs per node is more than the 8 H100-80GB GPUs a node holds"),
    (("--scheduler", "torchrun", "--gpus-per-node", "12"), "spread the 12 GPUs over more nodes, e.g. 2 nodes x 8 GPUs"),
    (("--scheduler", "torchrun", "--submit"), "a torchrun job has no scheduler to submit to"),
    (("--scheduler", "slurm", "--bucket", "s3://x"), "--bucket mounts a bucket as the runs folder of a SkyPilot job"),
])
def test_bad_job_input_gets_a_clear_message(tmp_path, args, message):
    assert message in _bad(tmp_path, *args, "--runs-dir", str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_submit_without_sbatch_says_so_and_writes_nothing(tmp_path):
    bare = tmp_path / "bin"  # a PATH with python and bash but no Slurm
    bare.mkdir()
    for tool in ("bash", "env"):
        os.symlink(shutil.which(tool), bare / tool)
    message = _bad(tmp_path, "--scheduler", "slurm", "--submit", "--runs-dir", str(tmp_path / "runs"),
                   env={**os.environ, "PATH": str(bare)})
    assert "--submit needs `sbatch` on the PATH" in message and "Nothing was written" in message
    assert not (tmp_path / "runs").exists()


def test_a_skypilot_job_needs_a_gpu_type_and_out_must_be_new(tmp_path):
    Plan.from_dict({"model": {"name": "llama-2-7b"}, "hardware": {"gpu_memory_gb": 40}}).save(tmp_path / "plan.yaml")
    assert "a SkyPilot job asks the cloud for a GPU type" in _bad(tmp_path, "--scheduler", "skypilot", "--runs-dir",
                                                                   str(tmp_path / "runs"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert "already exists and is not an empty folder" in _bad(tmp_path, "--scheduler", "slurm", "--out",
                                                               str(tmp_path / "taken"), "--runs-dir", str(tmp_path / "runs"))


def test_a_runs_folder_that_is_not_writable_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    gpu_plan().save(tmp_path / "plan.yaml")
    if os.geteuid() == 0:
        # root writes through permissions: make it a read-only filesystem, as a read-only NFS export is.
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tunewise-ro", str(locked)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"root cannot mount a read-only folder here: {mounted.stderr.strip()}")
        why = "Read-only file system"
    else:
        locked.chmod(0o555)
        why = "Permission denied"
    try:
        message = _bad(tmp_path, "--scheduler", "slurm", "--runs-dir", str(locked))
        assert f"runs folder {locked} is not writable ({why})" in message
        assert not list(locked.iterdir())
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(locked)], check=True)
        else:
            locked.chmod(0o755)


def test_a_local_launch_of_a_multi_node_plan_is_refused(runs_dir):
    with pytest.raises(TunewiseError, match="spans 2 machines and a launch runs on this one only: write a cluster job"):
        supervisor.launch(gpu_plan(num_nodes=2, num_gpus=8), runs_dir=runs_dir)
    assert not list(runs_dir.iterdir())


def _node_step(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.jobs", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_the_exit_record_says_how_a_job_that_did_not_report_ended(tmp_path):
    """The node-side steps around a trainer that died without its own terminal event (accelerate exited
    with 1, or the node was killed: 128 + 9), and a job started while a stop is pending."""
    runs = tmp_path / "runs"
    for code, described in ((1, "failed (exit 1)"), (137, "failed (signal 9)")):
        job = jobs.write_job(demo_plan(5), "torchrun", runs, nodes=1, gpus_per_node=1, main_ip="127.0.0.1")
        begun = _node_step("start", job.job_dir)
        assert begun.returncode == 0, begun.stderr
        attempt_id = begun.stdout.strip()
        status = supervisor.status(job.run_id, runs)
        assert (status.state, status.scheduler, status.pid) == ("running", "torchrun", None)  # no pid, not "failed"
        assert _node_step("record-exit", job.run_dir, "--code", str(code), "--attempt", attempt_id).returncode == 0
        status = supervisor.status(job.run_id, runs)
        assert status.state == "failed" and status.describe().split()[1:4] == described.split()
        (attempt,) = json.loads((Path(job.run_dir) / "run.json").read_text())["attempts"]
        assert attempt["attempt_id"] == attempt_id and attempt["ended_at"]
        assert read_all_events(Path(job.run_dir) / "events.jsonl")[-1]["event"] == "failed"
    stopped = jobs.write_job(demo_plan(5), "torchrun", runs, nodes=1, gpus_per_node=1, main_ip="127.0.0.1")
    (Path(stopped.run_dir) / "STOP").write_text("stopped by the user\n")
    refused = _node_step("start", stopped.job_dir)
    assert refused.returncode == jobs.NOT_STARTED_EXIT and "a stop was requested" in refused.stderr
    status = supervisor.status(stopped.run_id, runs)
    assert status.state == "stopped" and "before the job started" in status.reason


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_like_one_node_with_two_processes(tmp_path, demo_model_dir):
    plan = demo_plan(3)
    runs = tmp_path / "runs"
    port = free_port()
    job = jobs.write_job(plan, "torchrun", runs, nodes=2, gpus_per_node=1, main_ip="127.0.0.1", port=port)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"node{rank}.log", "w") for rank in (0, 1)]
    # The generated per-node commands, as a person runs them on two machines: MACHINE_RANK, MAIN_IP, the script.
    nodes = []
    for rank, command in enumerate(job.node_commands):
        assert command.startswith(f"MACHINE_RANK={rank} MAIN_IP=127.0.0.1 bash ")
        nodes.append(subprocess.Popen(["bash", str(Path(job.job_dir) / "launch_node.sh")], cwd=tmp_path,
                                      env={**env, "MACHINE_RANK": str(rank)}, stdout=logs[rank], stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        codes = [node.wait(timeout=400) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
                node.wait()
        for log in logs:
            log.close()
    assert codes == [0, 0], [(tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1)]
    status = supervisor.status(job.run_id, runs)
    assert status.state == "finished", (status.error, status.error_lines)
    run_dir = Path(job.run_dir)
    events = read_all_events(run_dir / "events.jsonl")
    assert [e["event"] for e in events].count("started") == 1 and events[0]["world_size"] == 2  # rank 0 writes
    assert sorted(p.name for p in (run_dir / "procs").iterdir()) == ["rank0.pid", "rank1.pid"]
    (attempt,) = json.loads((run_dir / "run.json").read_text())["attempts"]
    assert (attempt["scheduler"], attempt["exit_code"], attempt["pid"]) == ("torchrun", 0, None)
    assert (run_dir / "output" / "adapter_model.safetensors").is_file()
    assert f"tunewise: run {job.run_id}, torchrun job" in (run_dir / "stdout.log").read_text()  # the main node's log
    two_nodes = [(e["step"], e["loss"]) for e in events if e["event"] == "log"]

    # The same plan as one machine with two processes (tunewise train's accelerate launch), same seed.
    plan.save(tmp_path / "plan.yaml")
    local = tunewise("train", str(tmp_path / "plan.yaml"), "--num-processes", "2", "--runs-dir", str(tmp_path / "local"),
                     "--json", env=env)
    local_status = json.loads(local.stdout)
    assert local_status["state"] == "finished", local.stderr[-3000:]
    local_events = read_all_events(Path(local_status["run_dir"]) / "events.jsonl")
    assert local_events[0]["world_size"] == 2
    one_node = [(e["step"], e["loss"]) for e in local_events if e["event"] == "log"]
    assert [step for step, _ in two_nodes] == [1, 2, 3]
    assert [step for step, _ in one_node] == [1, 2, 3]
    for (_, theirs), (_, ours) in zip(one_node, two_nodes):
        assert ours == pytest.approx(theirs, rel=1e-5)
