"""Memory in real runs on the tiny model: the estimate in `started`, the measured peak in every `log`, the
run history keeping both, RoPE scaling past the model's window, the Liger kernel refused on the CPU, and the
words a run ends with when it runs out (torch's own CUDA out-of-memory error inside a real run; a real
address-space limit on the trainer process; the kernel's OOM killer seen by the watcher)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tiny_plan, wait_for
from test_trainer_sft import run_in_process  # the runner in this process, one torch thread

from trainer.events import read_all_events

pytestmark = pytest.mark.slow


def of_kind(events, kind):
    return [event for event in events if event["event"] == kind]


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """A real run in its own process, as the product launches it: its peak RSS is the run's alone (in this
    process it would be pytest's peak over every earlier test)."""
    from trainer import supervisor

    runs = tmp_path_factory.mktemp("measured")
    run_id = supervisor.launch(tiny_plan(tiny_model_dir, tiny_data_dir, {"training.max_steps": 4}), runs_dir=runs)
    status = supervisor.wait(run_id, timeout=300, runs_dir=runs)
    run_dir = runs / run_id
    code = 0 if status.state == "finished" else (status.exit_code or 1)
    return run_dir, code, read_all_events(run_dir / "events.jsonl")


def test_started_carries_the_estimate_and_every_log_the_measured_peak(measured_run):
    run_dir, code, events = measured_run
    assert code == 0
    estimate = of_kind(events, "started")[0]["memory_estimate"]
    assert estimate["device"] == "cpu" and estimate["compare"] == "memory/peak_rss_bytes"
    assert estimate["estimate_bytes"] == estimate["host_ram_bytes"] > 0
    assert set(estimate["host_components"]) >= {"runtime", "loading", "training"}
    logs = of_kind(events, "log")
    assert len(logs) >= 4
    peaks = [log["memory/peak_rss_bytes"] for log in logs]
    assert all(isinstance(p, int) and p > 100 * 2**20 for p in peaks)  # a Python process with torch imported
    assert peaks == sorted(peaks)  # a peak never falls
    # The host estimate is the right size for what the process really held (within a factor of 2 either way).
    assert 0.5 < peaks[-1] / estimate["host_ram_bytes"] < 2.0


def test_history_and_bench_keep_estimate_and_measured(measured_run):
    from trainer.status import derive_status

    run_dir, _, events = measured_run
    status = derive_status(run_dir)
    assert status.memory_estimate_bytes == of_kind(events, "started")[0]["memory_estimate"]["estimate_bytes"]
    assert status.memory_measured_bytes == of_kind(events, "log")[-1]["memory/peak_rss_bytes"]
    assert status.memory_kind == "host RAM (peak RSS)"
    assert status.to_dict()["memory_measured_bytes"] == status.memory_measured_bytes
    out = subprocess.run([sys.executable, "bench/memory_runs.py", str(run_dir.parent)], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert status.run_id in out and "host RAM" in out and "%" in out


def test_the_monitor_chart_and_the_history_row_show_measured_against_the_estimate(measured_run):
    import figures
    from advisor import wizard
    from trainer import runs

    run_dir, _, events = measured_run
    estimate = of_kind(events, "started")[0]["memory_estimate"]["estimate_bytes"]
    logs = of_kind(events, "log")
    series = figures.memory_series(events)
    assert series.device == "cpu" and series.estimate == estimate
    assert series.steps == tuple(log["step"] for log in logs)
    assert series.measured == tuple(log["memory/peak_rss_bytes"] for log in logs)
    peak = logs[-1]["memory/peak_rss_bytes"]
    assert series.error_pct == pytest.approx(100.0 * (estimate - peak) / peak)
    fig = figures.memory_run_figure(events)
    names = [trace.name for trace in fig.data]
    assert names[0] == "measured: host RAM (peak RSS)" and names[1].startswith("host RAM estimate")
    scale, unit = (1e9, "GB") if max(*series.measured, estimate) >= 1e9 else (1e6, "MB")
    assert list(fig.data[0].y) == pytest.approx([m / scale for m in series.measured])
    assert fig.data[1].y[0] == pytest.approx(estimate / scale) and fig.layout.yaxis.title.text == unit
    assert fig.layout.title.text.endswith(f"{series.error_pct:+.0f}%")
    # Before the first log the chart says what it waits for, with the estimate already known.
    waiting = figures.memory_run_figure(of_kind(events, "started"))
    shown = f"{estimate / 1e9:.2f} GB" if estimate >= 1e9 else f"{estimate / 1e6:.0f} MB"
    assert f"Estimate {shown};" in waiting.layout.annotations[0].text
    # The run history keeps both in a column of its own.
    status = next(s for s in runs.history(run_dir.parent) if s.run_id == run_dir.name)
    row = dict(zip(wizard.RUN_HEADERS, wizard.run_row(status)))
    error = 100.0 * (estimate - peak) / peak
    assert row["memory (estimate / measured)"] == f"{estimate / scale:.2f} / {peak / scale:.2f} {unit} ({error:+.0f}%)"
    assert wizard.memory_cell(None, None) == "-" and wizard.memory_cell(2_000_000, None) == "2.00 / - MB"


def test_the_chart_reads_cuda_allocated_and_reserved_per_log():
    """The chart's CUDA reading, from the keys the trainer writes there (trainer.memwatch.measured_memory)."""
    import figures

    events = [{"event": "started", "memory_estimate": {"device": "cuda", "estimate_bytes": 10 * 10**9}}]
    events += [{"event": "log", "step": step, "loss": 1.0, "memory/max_allocated_bytes": value * 10**9,
                "memory/max_reserved_bytes": (value + 1) * 10**9} for step, value in ((1, 9), (2, 11))]
    series = figures.memory_series(events)
    assert series.device == "cuda" and series.measured == (9 * 10**9, 11 * 10**9)
    assert series.reserved == (10 * 10**9, 12 * 10**9) and series.error_pct == pytest.approx(-100 / 11)
    fig = figures.memory_run_figure(events)
    assert [t.name for t in fig.data] == ["reserved (max_memory_reserved)", "measured: GPU tensors (max_memory_allocated)",
                                          "estimated peak per GPU 10.00 GB"]
    assert fig.layout.title.text.endswith("-9%")


def _long_texts(path: Path, tokens_at_least: int, rows: int = 8) -> Path:
    words = " ".join(f"The apple number {i % 9} is red." for i in range(tokens_at_least // 4))
    path.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(rows)), encoding="utf-8")
    return path


def test_twice_the_window_trains_with_rope_scaling_and_is_refused_without(tmp_path, tiny_model_dir, tiny_data_dir):
    from transformers import AutoTokenizer

    window = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    data = _long_texts(tmp_path / "long.jsonl", 4 * window)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer(json.loads(data.read_text().splitlines()[0])["text"])["input_ids"]) > 2 * window
    overrides = {"data.dataset": str(data), "data.format": "text", "training.seq_len": 2 * window,
                 "training.max_steps": 2, "training.micro_batch": 1, "method.lora_targets": ["q_proj", "v_proj"]}
    code, events = run_in_process(tiny_plan(tiny_model_dir, tiny_data_dir, overrides), tmp_path / "plain")
    failed = of_kind(events, "failed")[0]
    assert code == 2 and failed["field"] == "training.seq_len" and "training.rope_scaling" in failed["error"]
    assert not of_kind(events, "log")
    scaled = {**overrides, "training.rope_scaling": "linear"}
    code, events = run_in_process(tiny_plan(tiny_model_dir, tiny_data_dir, scaled), tmp_path / "scaled")
    assert code == 0, of_kind(events, "failed")
    assert len(of_kind(events, "log")) >= 2 and all(e["loss"] > 0 for e in of_kind(events, "log"))
    notice = " ".join(e["message"] for e in of_kind(events, "notice"))
    assert "RoPE scaling linear x2" in notice and f"{2 * window} positions" in notice
    # The factor too small for the sequence is refused naming it.
    code, events = run_in_process(tiny_plan(tiny_model_dir, tiny_data_dir, {**scaled, "training.rope_factor": 1.5}),
                                  tmp_path / "small-factor")
    assert code == 2 and of_kind(events, "failed")[0]["field"] == "training.rope_factor"


def test_scaled_config_writes_transformers_rope_parameters(tiny_model_dir, tiny_data_dir):
    from trainer.models import scaled_config

    for kind, grows in (("linear", True), ("dynamic", False), ("yarn", True)):
        plan = tiny_plan(tiny_model_dir, tiny_data_dir, {"training.rope_scaling": kind, "training.seq_len": 1000})
        config = scaled_config(plan, str(tiny_model_dir))
        assert config.rope_parameters["rope_type"] == kind and config.rope_parameters["factor"] == 4.0
        assert config.max_position_embeddings == (1024 if grows else 256)
        if kind == "yarn":
            assert config.rope_parameters["original_max_position_embeddings"] == 256
    assert scaled_config(tiny_plan(tiny_model_dir, tiny_data_dir), str(tiny_model_dir)) is None


def test_liger_kernel_is_refused_on_the_cpu(tmp_path, tiny_model_dir, tiny_data_dir):
    plan = tiny_plan(tiny_model_dir, tiny_data_dir, {"method.use_liger_kernel": True})
    code, events = run_in_process(plan, tmp_path / "liger")
    failed = of_kind(events, "failed")[0]
    assert code == 2 and failed["field"] == "method.use_liger_kernel"
    assert "CUDA GPUs" in failed["error"] and "--no-liger-kernel" in failed["error"]


def test_training_args_pass_the_liger_kernel_to_trl(tiny_model_dir, tiny_data_dir, tmp_path):
    from trainer.context import RunContext
    from trainer.events import EventWriter
    from trainer.models import resolve_precision
    from trainer.training_args import training_kwargs

    plan = tiny_plan(tiny_model_dir, tiny_data_dir, {"method.use_liger_kernel": True})
    ctx = RunContext(plan=plan, run_dir=tmp_path, events=EventWriter(tmp_path / "events.jsonl"))
    assert training_kwargs(ctx, resolve_precision(plan), False)["use_liger_kernel"] is True


def test_cuda_out_of_memory_inside_a_real_run_says_what_to_do(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    """torch's own torch.cuda.OutOfMemoryError, raised from inside the Trainer's loop at step 2 of a real run."""
    import torch

    from trainer import callbacks

    original = callbacks.EventsCallback.on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        original(self, args, state, control, logs=logs, **kwargs)
        if state.global_step >= 2:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 4.00 MiB. GPU 0 has a total capacity of 390.00 MiB of which "
                "1.00 MiB is free.")

    monkeypatch.setattr(callbacks.EventsCallback, "on_log", on_log)
    # The plan's GPU (this machine has none): 1 MB more than the estimate says the run needs, so the planner
    # thought it fits; the fix must make the run smaller by what it really lacked.
    from advisor.memory import estimate, setup_from_plan
    from advisor.specs import resolve_model

    plan = tiny_plan(tiny_model_dir, tiny_data_dir)
    total = estimate(resolve_model(str(tiny_model_dir), allow_hub=False), setup_from_plan(plan)).total_bytes
    plan = plan.with_overrides({"hardware.gpu_memory_gb": (total + 1e6) / 1e9})
    code, events = run_in_process(plan, tmp_path / "oom")
    failed = of_kind(events, "failed")[-1]
    assert code == 4 and failed["oom"] == "cuda" and failed["user_error"] is True
    assert len(of_kind(events, "log")) == 2  # the steps before it were logged with their memory
    message = failed["error"]
    assert message.startswith("CUDA out of memory at step 2: the plan estimated")
    assert f"{failed['estimate_bytes'] / 1e6:.1f} MB of tensors at the peak" in message
    assert failed["gpu_bytes"] == int(total + 1e6) and f"the GPU has {failed['gpu_bytes'] / 1e9:.2f} GB" in message
    assert "measured peak before the failure" in message and "tried to allocate 4.2 MB" in message
    assert "Cheapest fix for this plan: " in message and failed["cheapest_fix"] in message
    assert "traceback" not in failed


def _limited(limit_bytes: int):
    def preexec():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return preexec


def test_host_ram_running_out_under_a_real_address_space_limit(tmp_path, tiny_model_dir, tiny_data_dir):
    """The trainer process, started as the watcher starts it, under an address-space limit its training
    cannot fit in (a plan with a huge batch): it ends with a `failed` event saying host RAM ran out, with the
    host estimate, this machine's RAM and the measured peak."""
    from trainer.status import derive_status

    run_dir = tmp_path / "tight"
    run_dir.mkdir()
    plan = tiny_plan(tiny_model_dir, tiny_data_dir, {"training.micro_batch": 64, "training.seq_len": 256,
                                                     "data.dataset": str(_long_texts(tmp_path / "long.jsonl", 400, 64)),
                                                     "data.format": "text", "training.max_steps": 2})
    plan.save(run_dir / "plan.yaml")
    # Measure the address space a trainer needs before training (imports, threads), then allow a little more.
    probe = subprocess.run([sys.executable, "-c", "import torch, transformers, trl, peft, datasets; "
                            "import re; print(re.search(r'VmPeak:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"],
                           capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    baseline = int(probe.stdout.strip()) * 1024
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer.runner", str(run_dir)], cwd=REPO_ROOT, env=env,
                          preexec_fn=_limited(baseline + 400 * 2**20), capture_output=True, text=True, timeout=600)
    events = read_all_events(run_dir / "events.jsonl")
    failed = of_kind(events, "failed")
    assert failed, proc.stderr[-2000:]
    failed = failed[-1]
    assert proc.returncode == 4 and failed["oom"] == "host", failed
    assert failed["error"].startswith("out of host memory (RAM)")
    assert "host RAM estimate is" in failed["error"] and "this machine has" in failed["error"]
    assert failed["host_estimate_bytes"] > 0 and failed["measured_peak_bytes"] > 0
    assert "address-space limit" in failed["error"] and "Cheapest fix for this plan: " in failed["error"]
    assert derive_status(run_dir).state == "failed"


def test_a_kill_by_sigkill_is_explained_with_the_host_estimate(runs_dir, make_plan):
    """A trainer killed by SIGKILL mid-run (as the OOM killer kills): the watcher's `failed` event names the OOM
    killer and the host estimate; with the cgroup's OOM-kill count risen it says so for certain."""
    from trainer import supervisor
    from trainer.events import read_all_events as read
    from trainer.memwatch import oom_killed_message
    from trainer.rundir import RUN_FILE, read_json

    run_id = supervisor.launch(make_plan(training__max_steps=400, training__logging_steps=1), runs_dir)
    run_dir = runs_dir / run_id
    wait_for(lambda: any(e["event"] == "log" for e in read(run_dir / "events.jsonl")), 240, "the first log")
    pid = read_json(run_dir / RUN_FILE)["attempts"][-1]["pid"]
    os.kill(pid, signal.SIGKILL)
    status = supervisor.wait(run_id, timeout=60, runs_dir=runs_dir)
    assert status.state == "failed" and status.signal == signal.SIGKILL
    failed = [e for e in read(run_dir / "events.jsonl") if e["event"] == "failed"][-1]
    assert "OOM killer" in failed["error"] and "host RAM estimate is" in failed["error"]
    started = [e for e in read(run_dir / "events.jsonl") if e["event"] == "started"][0]
    assert f"{started['memory_estimate']['host_ram_bytes'] / 1e9:.2f} GB" in failed["error"]
    assert failed["oom"] in ("host", "maybe_host")
    certain = oom_killed_message({"host_ram_bytes": 2e9}, 1e9, 4e9, certain=True)
    assert certain.startswith("the kernel's OOM killer ended the training process")


def test_out_of_memory_errors_are_told_apart():
    """Which failures are GPU memory, which host RAM: torch's own errors and the messages its allocators give."""
    import torch

    from trainer.memwatch import is_cuda_oom, is_host_oom

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    library = torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    host = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)")
    mps = RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)")
    assert [is_cuda_oom(e) for e in (cuda, library, host, mps, MemoryError())] == [True, True, False, False, False]
    assert [is_host_oom(e) for e in (cuda, library, host, mps, MemoryError())] == [False, False, True, False, True]
    # A real refused allocation on this CPU, of more bytes than any machine has.
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        assert is_host_oom(exc) and not is_cuda_oom(exc), str(exc)
    else:
        pytest.fail("allocating 4 EiB did not fail")
