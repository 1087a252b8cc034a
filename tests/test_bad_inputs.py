"""Bad input, table-driven: every mistake gets a message naming the problem, fast, without a traceback.

Each CLI case runs the real `tunewise` entry point (`python cli.py ...`) in a
subprocess from an empty working directory and checks: a non-zero exit (or
the stated one), a message containing the case's substring, no "Traceback"
anywhere in the output, no hang (a time limit), and nothing written outside
the runs folder (the working directory and the input files are unchanged).
The UI cases send the same kind of mistakes to a real `python app.py`
server in demo mode through its API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / "cli.py")

#: Longest any bad input may take to be refused (seconds): no hub timeouts, no model loads.
MAX_SECONDS = 45


@dataclass(frozen=True)
class Case:
    """One bad input on the command line."""

    name: str
    args: tuple[str, ...]
    """cli.py arguments; {data}, {runs}, {tiny} and {fake} are filled in."""
    expect: tuple[str, ...]
    """Substrings the output must contain (all of them)."""
    rc: int | None = None
    """The exit code wanted; None: any non-zero."""
    env: dict = field(default_factory=dict)
    """Extra environment ({shadow} is filled in)."""


def c(name, args, *expect, rc=None, env=None):
    return Case(name, tuple(args.split()), tuple(expect), rc, env or {})


TRAIN = "train --runs-dir {runs} --model {tiny} --dataset {data}/messages.jsonl --max-steps 2 --seq-len 64 --device cpu"

CLI_CASES = [
    # models
    c("unknown model", "plan --model no-such-model-xyz", "unknown model 'no-such-model-xyz'", rc=2),
    c("offline hub id (plan)", "plan --model someorg/some-model-that-is-not-local", "someorg/some-model-that-is-not-local",
      "offline", rc=2),
    c("offline hub id (train)", "train --runs-dir {runs} --model someorg/some-model-that-is-not-local --dataset demo-sft",
      "cannot be reached", rc=2),
    c("model folder without config.json", TRAIN.replace("{tiny}", "{data}"), "has no config.json", rc=2),
    # datasets
    c("malformed JSONL at line 4 (profile)", "profile {data}/malformed.jsonl", "line 4 of malformed.jsonl", rc=2),
    c("malformed JSONL at line 4 (train)", TRAIN.replace("messages.jsonl", "malformed.jsonl"), "line 4 of malformed.jsonl",
      "not valid JSON", rc=2),
    c("wrong columns", TRAIN.replace("messages.jsonl", "wrong.jsonl"), "columns (foo, bar)", rc=2),
    c("missing column on line 2", "profile {data}/missing_column.jsonl", "line 2 of missing_column.jsonl",
      "'completion' is missing", rc=2),
    c("empty dataset", TRAIN.replace("messages.jsonl", "empty.jsonl"), "empty.jsonl is empty", rc=2),
    c("non-UTF-8 dataset", "profile {data}/latin1.jsonl", "line 1 of latin1.jsonl is not UTF-8", rc=2),
    c("dataset file missing", TRAIN.replace("messages.jsonl", "nope.jsonl"), "nope.jsonl does not exist", rc=2),
    c("hub dataset while offline", "profile someorg/somedataset", "needs the network", rc=2),
    c("unsupported file type", "profile {data}/table.xlsx", "unsupported file type '.xlsx'", rc=2),
    c("dataset is a directory", "profile {data}", "is a directory", rc=2),
    c("DPO on an SFT dataset (no chosen/rejected)", TRAIN + " --stage dpo", "chosen", "rejected", rc=2),
    # settings
    c("LoRA rank 0", TRAIN + " --lora-rank 0", "method.lora_rank", rc=2),
    c("negative learning rate", TRAIN + " --lr=-1e-4", "training.learning_rate", rc=2),
    c("learning rate NaN", TRAIN + " --lr nan", "training.learning_rate", rc=2),
    c("sequence longer than the model's maximum", TRAIN.replace("--seq-len 64", "--seq-len 4096"),
      "training.seq_len: 4096 is longer than", "window of 256 positions", "training.rope_scaling", rc=2),
    c("QLoRA without bitsandbytes", TRAIN + " --method qlora", "QLoRA needs bitsandbytes", rc=2,
      env={"PYTHONPATH": "{shadow}"}),
    c("GPU count 0 (plan)", "plan --model llama-2-7b --gpus 0", "hardware.num_gpus", rc=2),
    c("GPU count not a number", "plan --model llama-2-7b --gpus many", "--gpus", "invalid int value", rc=2),
    c("GPU count negative (train)", TRAIN + " --gpus=-3", "hardware.num_gpus", rc=2),
    c("negative max steps", TRAIN.replace("--max-steps 2", "--max-steps -5"), "training.max_steps", rc=2),
    c("dropout 1.5", TRAIN + " --lora-dropout 1.5", "method.lora_dropout", rc=2),
    c("unknown optimizer", TRAIN + " --optimizer adam9000", "method.optimizer", "adam9000", rc=2),
    c("unknown stage", TRAIN + " --stage pretrain", "stage", "pretrain", rc=2),
    c("unknown precision", TRAIN + " --precision fp8", "method.precision", rc=2),
    c("eval fraction 0.9", TRAIN + " --eval-fraction 0.9", "data.eval_fraction", rc=2),
    c("EWC strength infinity", TRAIN + " --ewc inf", "forgetting.ewc_lambda", "not a finite number", rc=2),
    c("EWC strength NaN", TRAIN + " --ewc nan", "forgetting.ewc_lambda", "not a finite number", rc=2),
    c("EWC strength 1e308", TRAIN + " --ewc 1e308", "forgetting.ewc_lambda", "from 0 to 1,000,000", rc=2),
    c("DPO beta infinity", TRAIN + " --beta inf", "preference.beta", rc=2),
    c("micro-batch 10 million (train)", TRAIN + " --micro-batch 10000000", "training.micro_batch", "from 1 to 65,536", rc=2),
    c("LoRA target the model does not have", TRAIN + " --lora-targets nonexistent_proj", "nonexistent_proj", rc=2),
    c("CUDA asked on a machine without one", TRAIN.replace("--device cpu", "--device cuda"), "no CUDA GPU", rc=2),
    c("PPO without a reward model", TRAIN.replace("messages.jsonl", "prompt_completion.jsonl") + " --stage ppo",
      "reward_model", rc=2),
    # plan files
    c("plan file with an unknown key", "train {data}/plan_unknown_key.yaml --runs-dir {runs}", "training.learnign_rate",
      "not a known setting", rc=2),
    c("plan file that is a list", "train {data}/plan_list.yaml --runs-dir {runs}", "must be a mapping", rc=2),
    c("plan file that is not YAML", "train {data}/plan_broken.yaml --runs-dir {runs}", "not valid YAML", rc=2),
    c("plan file not UTF-8", "train {data}/plan_latin1.yaml --runs-dir {runs}", "not UTF-8", rc=2),
    c("plan file missing", "train {data}/no_such_plan.yaml --runs-dir {runs}", "no_such_plan.yaml does not exist", rc=2),
    c("plan file with EWC .inf", "train {data}/plan_ewc_inf.yaml --runs-dir {runs}", "forgetting.ewc_lambda",
      "not a finite number", rc=2),
    # runs
    c("status of an unknown run", "status 20990101-nope --runs-dir {runs}", "no run '20990101-nope'", rc=2),
    c("stop of a finished run", "stop {fake}/finished --runs-dir {runs}", "already finished", rc=2),
    c("resume of a finished run", "resume {fake}/finished --runs-dir {runs}", "has finished", "nothing to resume", rc=2),
    c("merge of a run without an adapter", "merge {fake}/no_adapter", "has no saved adapter", rc=2),
    c("merge of a full fine-tuning run", "merge {fake}/full", "no adapter to merge", rc=2),
    c("merge of a QLoRA run", "merge {fake}/qlora", "4-bit", "--reload-16bit", rc=2),
]


def _snapshot(*roots: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under `roots`, except under `skip`."""
    found = {}
    for root in roots:
        for path in root.rglob("*"):
            if skip in path.parents or path == skip or "__pycache__" in path.parts:
                continue
            stat = path.stat()
            found[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns if path.is_file() else 0)
    return found


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """Bad files, fake runs and a shadow `bitsandbytes` that fails to import."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "data"
    data.mkdir()
    for name in ("messages.jsonl", "prompt_completion.jsonl", "preference.jsonl"):
        (data / name).write_bytes((tiny_data_dir / name).read_bytes())
    (data / "malformed.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"text": oops}\n{"text": "e"}\n')
    (data / "wrong.jsonl").write_text('{"foo": "a", "bar": "b"}\n' * 4)
    (data / "missing_column.jsonl").write_text('{"prompt": "a", "completion": "x"}\n{"prompt": "b"}\n')
    (data / "empty.jsonl").write_text("")
    (data / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    (data / "table.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    (data / "plan_unknown_key.yaml").write_text("model:\n  name: demo\ntraining:\n  learnign_rate: 0.0001\n")
    (data / "plan_list.yaml").write_text("- model: demo\n- training: {}\n")
    (data / "plan_broken.yaml").write_text("model: [demo\ntraining: {max_steps: 3\n")
    (data / "plan_latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (data / "plan_ewc_inf.yaml").write_text("model:\n  name: demo\nforgetting:\n  ewc_lambda: .inf\n")

    from advisor.plan import Plan

    base = {"model": {"name": str(tiny_model_dir)}, "data": {"dataset": str(data / "messages.jsonl")}}
    fake = root / "fake"
    for run_name, method, output in (("finished", "lora", None), ("no_adapter", "lora", None),
                                     ("full", "full", "config.json"), ("qlora", "qlora", "adapter_config.json")):
        run_dir = fake / run_name
        run_dir.mkdir(parents=True)
        Plan.from_dict({**base, "method": {"method": method}}).save(run_dir / "plan.yaml")
        now = time.time()
        (run_dir / "run.json").write_text(json.dumps({
            "run_id": run_name, "created_at": now - 60, "summary": "",
            "attempts": [{"started_at": now - 60, "pid": 999_999_999, "ended_at": now - 30, "exit_code": 0}]}))
        (run_dir / "events.jsonl").write_text(
            json.dumps({"event": "started", "time": now - 59, "step": 0}) + "\n"
            + json.dumps({"event": "finished", "time": now - 31, "step": 2}) + "\n")
        if output:
            (run_dir / "output").mkdir()
            (run_dir / "output" / output).write_text(json.dumps(
                {"base_model_name_or_path": str(tiny_model_dir), "peft_type": "LORA", "r": 8} if output.startswith("adapter")
                else {"model_type": "llama"}))
    shadow = root / "shadow"
    (shadow / "bitsandbytes").mkdir(parents=True)
    (shadow / "bitsandbytes" / "__init__.py").write_text('raise ImportError("bitsandbytes is hidden by the test")\n')
    return {"root": root, "data": data, "fake": fake, "shadow": shadow, "tiny": tiny_model_dir}


def _fill(text: str, values: dict) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.name for case in CLI_CASES])
def test_cli_bad_input(case: Case, bad, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    runs = work / "runs"
    values = {"data": bad["data"], "runs": runs, "tiny": bad["tiny"], "fake": bad["fake"], "shadow": bad["shadow"]}
    args = [_fill(arg, values) for arg in case.args]
    env = {k: v for k, v in os.environ.items() if k != "TUNEWISE_RUNS_DIR"}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    for key, value in case.env.items():
        env[key] = _fill(value, values) + (os.pathsep + env[key] if env.get(key) else "")
    before = _snapshot(work, bad["root"], skip=runs)

    began = time.monotonic()
    done = subprocess.run([sys.executable, CLI, *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=MAX_SECONDS + 30)
    elapsed = time.monotonic() - began
    output = done.stdout + done.stderr

    assert elapsed < MAX_SECONDS, f"took {elapsed:.1f}s"
    assert "Traceback" not in output, output
    if case.rc is None:
        assert done.returncode != 0, output
    else:
        assert done.returncode == case.rc, (done.returncode, output)
    for text in case.expect:
        assert text in output, f"{text!r} not in:\n{output}"
    assert _snapshot(work, bad["root"], skip=runs) == before, "something was written outside the runs folder"


# -- the UI's API, on a real server in demo mode -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`python app.py --demo-mode` started from an empty working directory; yields (url, client, work dir)."""
    import signal
    import urllib.request

    from gradio_client import Client

    work = tmp_path_factory.mktemp("ui-work")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(work / "gradio-tmp"), "HF_HUB_OFFLINE": "1"}
    env.pop("TUNEWISE_RUNS_DIR", None)
    log = open(work.parent / "ui-app.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--demo-mode"], cwd=work,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 150
    while True:
        assert proc.poll() is None, (work.parent / "ui-app.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            assert time.time() < deadline, "app.py did not serve within 150 s"
            time.sleep(0.3)
    try:
        yield url, Client(url, verbose=False), work
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # Nothing was written outside the runs folder (and the web framework's upload cache).
        assert {p.name for p in work.iterdir()} <= {"runs", "gradio-tmp"}


SMALL = "HuggingFaceTB/SmolLM2-135M"

#: (name, endpoint, arguments, substrings of the message)
UI_CASES = [
    ("unknown model", "/model_info", {"model": "no-such-model-xyz"}, ("unknown model 'no-such-model-xyz'",)),
    ("offline hub id", "/model_info", {"model": "someorg/some-model-that-is-not-local"},
     ("someorg/some-model-that-is-not-local", "offline")),
    ("server folder as model (demo)", "/model_info", {"model": "/etc"}, ("model.name", "does not read folders")),
    ("empty model", "/estimate", {"model": "  "}, ("model.name", "empty")),
    ("negative learning rate", "/estimate", {"model": SMALL, "learning_rate": -1}, ("training.learning_rate",)),
    # Gradio's own range checks on number boxes: they name the value and the limit, not the field.
    ("LoRA rank 0", "/estimate", {"model": SMALL, "lora_rank": 0}, ("LoRA rank: 0 is out of range; enter a value from 1 to 16,384",)),
    ("GPU count 0", "/estimate", {"model": SMALL, "gpu": "A100-80GB", "num_gpus": 0}, ("Number of GPUs: 0 is out of range; enter a value from 1 to 1,024",)),
    ("dropout 1.5", "/estimate", {"model": SMALL, "lora_dropout": 1.5}, ("LoRA dropout: 1.5 is out of range; enter a value from 0 to 0.9",)),
    ("sequence longer than the model's maximum", "/estimate", {"model": SMALL, "seq_len": 100_000},
     ("training.seq_len", "window of 8192 positions", "training.rope_scaling")),
    ("unknown optimizer", "/estimate", {"model": SMALL, "optimizer": "adam9000"}, ("adam9000",)),
    ("server file as dataset (demo)", "/profile", {"dataset": "/etc/passwd", "model": "demo"},
     ("data.dataset", "only the bundled datasets")),
    ("non-demo model launch (demo)", "/launch", {"model": SMALL, "max_steps": 5}, ("model.name", "demo model")),
    ("path traversal as dataset (demo)", "/launch", {"model": "demo", "dataset": "../../etc/passwd"},
     ("data.dataset", "../../etc/passwd")),
    ("run id with a path", "/watch", {"run_id": "../../etc"}, ("../../etc is not in the list of choices",)),
    ("negative max steps", "/estimate", {"model": SMALL, "max_steps": -5}, ("Max steps (0: run the epochs): -5 is out of range",)),
    ("warmup share 0.9", "/estimate", {"model": SMALL, "warmup_ratio": 0.9}, ("Warmup share: 0.9 is out of range; enter a value from 0 to 0.5",)),
]


@pytest.mark.parametrize("name, endpoint, arguments, expect", UI_CASES, ids=[case[0] for case in UI_CASES])
def test_ui_bad_input(ui, name, endpoint, arguments, expect):
    from gradio_client.exceptions import AppError

    _, client, _ = ui
    began = time.monotonic()
    with pytest.raises(AppError) as refused:
        client.predict(**arguments, api_name=endpoint)
    message = str(refused.value)
    assert time.monotonic() - began < MAX_SECONDS
    assert "Traceback" not in message and "File \"" not in message, message
    for text in expect:
        assert text in message, f"{text!r} not in {message!r}"


#: (file name, bytes, substrings of the profile's message)
UPLOAD_CASES = [
    ("malformed.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"text": oops}\n', ("line 4 of malformed.jsonl",)),
    ("latin1.jsonl", '{"text": "café"}\n'.encode("latin-1"), ("line 1 of latin1.jsonl is not UTF-8",)),
    ("empty.jsonl", b"", ("empty.jsonl is empty",)),
    ("columns.csv", b"foo,bar\n1,2\n", ("columns (foo, bar)",)),
    ("preference.jsonl", b'{"prompt": "a", "chosen": "b"}\n', ("columns (prompt, chosen)",)),
]


@pytest.mark.parametrize("file_name, content, expect", UPLOAD_CASES, ids=[case[0] for case in UPLOAD_CASES])
def test_ui_bad_upload_is_named_by_the_profile(ui, tmp_path, file_name, content, expect):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client, work = ui
    source = tmp_path / file_name
    source.write_bytes(content)
    kept = client.predict(handle_file(str(source)), api_name="/upload")["value"]
    # The page gets the file's name (the public demo shows no server paths); the file is kept under runs/.
    assert kept == file_name
    assert content in [p.read_bytes() for p in (work / "runs" / "_uploads").rglob(file_name)]
    with pytest.raises(AppError) as refused:
        client.predict(dataset=kept, model="demo", api_name="/profile")
    message = str(refused.value)
    assert "Traceback" not in message
    for text in expect:
        assert text in message, f"{text!r} not in {message!r}"


def test_ui_huge_upload_is_refused_by_the_server(ui, tmp_path):
    import httpx

    url, _, work = ui
    huge = tmp_path / "huge.jsonl"
    line = b'{"text": "' + b"a" * 1000 + b'"}\n'
    huge.write_bytes(line * (21_000_000 // len(line) + 1))  # just over the demo's 20 MB
    with open(huge, "rb") as handle:
        answer = httpx.post(url + "gradio_api/upload", files={"files": ("huge.jsonl", handle)}, timeout=60)
    assert answer.status_code == 413 and "maximum allowed size" in answer.text, (answer.status_code, answer.text[:300])
    assert not list((work / "runs").rglob("huge*"))


# -- hostile numbers: a clear answer at once, never a search that grows with the number ------------------------

#: Longer than this beyond an ordinary request of the same command (which includes the process start) is a hang.
HANDLER_SECONDS = 1.0
#: How long a request may run before the test gives up on it (the old search took minutes to forever).
GIVE_UP_SECONDS = 30

PLAN_7B = "plan --model llama-2-7b --gpu RTX-4090"
RECOMMEND_7B = "recommend --model llama-2-7b --examples 20000 --task qa --gpu RTX-4090"

#: (arguments, exit code, substrings of the output)
HOSTILE_CLI = [
    (PLAN_7B + " --micro-batch 10000000", 2, ("training.micro_batch", "from 1 to 65,536", "got 10000000")),
    (PLAN_7B + f" --micro-batch {10**30}", 2, ("training.micro_batch", "from 1 to 65,536")),
    (PLAN_7B + " --micro-batch 1e30", 2, ("--micro-batch", "invalid int value")),
    (PLAN_7B + f" --lora-rank {10**19}", 2, ("method.lora_rank", "from 1 to 16,384")),
    (PLAN_7B + f" --seq-len {10**30}", 2, ("training.seq_len", "from 1 to 2,097,152")),
    (PLAN_7B + " --gpus 10000000", 2, ("hardware.num_gpus", "from 1 to 1,024")),
    (PLAN_7B + " --lora-dropout nan", 2, ("method.lora_dropout", "not a finite number")),
    ("plan --model llama-2-7b --gpu-memory-gb 1e308", 2, ("--gpu-memory-gb", "at most 10,000")),
    ("plan --model llama-2-7b --gpu-memory-gb nan", 2, ("--gpu-memory-gb", "not a finite number")),
    ("plan --model llama-2-7b --gpu-memory-gb inf", 2, ("--gpu-memory-gb", "not a finite number")),
    # The largest micro-batch allowed still gets its fix, found by bisection.
    (PLAN_7B + " --micro-batch 65536", 0, ("lower the micro-batch to", "(same effective batch)")),
    (RECOMMEND_7B + " --set micro_batch=10000000", 2, ("training.micro_batch", "from 1 to 65,536")),
    (RECOMMEND_7B + f" --set micro_batch={10**30}", 2, ("training.micro_batch",)),
    (RECOMMEND_7B + f" --set lora_rank={10**19}", 2, ("method.lora_rank", "from 1 to 16,384")),
    (RECOMMEND_7B + " --set ewc_lambda=.inf", 2, ("forgetting.ewc_lambda", "not a finite number")),
    (RECOMMEND_7B + " --set learning_rate=1e308", 2, ("training.learning_rate", "at most 1")),
    (RECOMMEND_7B + " --set micro_batch=65536", 0, ("micro_batch", "does not fit")),
    (f"recommend --model llama-2-7b --examples {10**30} --task qa", 2, ("examples", "from 1 to 1,000,000,000,000")),
    (RECOMMEND_7B + f" --tokens {10**30}", 2, ("tokens", "from 1 to")),
    (RECOMMEND_7B + " --seq-len 10000000", 2, ("seq_len", "from 1 to 2,097,152")),
    (RECOMMEND_7B + " --gpu-memory-gb 1e308", 2, ("gpu_memory_gb", "at most 10,000")),
]


def _cli(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    began = time.monotonic()
    done = subprocess.run([sys.executable, CLI, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=GIVE_UP_SECONDS)
    return done, time.monotonic() - began


@pytest.fixture(scope="module")
def ordinary_cli_seconds(tmp_path_factory) -> dict[str, float]:
    """How long an ordinary `plan` / `recommend` on the same model and GPU takes, process start included."""
    work = tmp_path_factory.mktemp("ordinary")
    times = {}
    for command in (PLAN_7B, RECOMMEND_7B):
        runs = [_cli(command.split(), work) for _ in range(2)]
        assert all(done.returncode == 0 for done, _ in runs), runs[0][0].stderr
        times[command.split()[0]] = min(seconds for _, seconds in runs)
    return times


@pytest.mark.parametrize("args, rc, expect", HOSTILE_CLI,
                         ids=[case[0].replace(PLAN_7B, "plan").replace(RECOMMEND_7B, "recommend")[:60] for case in HOSTILE_CLI])
def test_cli_hostile_numbers_answer_at_once(args, rc, expect, ordinary_cli_seconds, tmp_path):
    done, seconds = _cli(args.split(), tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == rc, output
    assert "Traceback" not in output, output
    for text in expect:
        assert text in output, f"{text!r} not in:\n{output}"
    ordinary = ordinary_cli_seconds[args.split()[0]]
    assert seconds < ordinary + HANDLER_SECONDS, f"took {seconds:.2f}s (an ordinary request: {ordinary:.2f}s)"


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    """`python app.py --demo-mode --no-warm-worker` on a free port; yields a gradio_client Client."""
    from gradio_client import Client

    from conftest import start_app, stop_app

    root = tmp_path_factory.mktemp("hostile-app")
    proc, url = start_app(root / "runs", "--demo-mode", "--no-warm-worker", log_path=root / "app.log")
    try:
        yield Client(url, verbose=False)
    finally:
        stop_app(proc)


SEVEN_B = {"model": "meta-llama/Llama-2-7b-hf", "gpu": "RTX-4090", "method": "lora"}

#: (endpoint, arguments beyond SEVEN_B, substrings of the message). Number boxes refuse values beyond the
#: plan's maxima themselves; LoRA rank too.
HOSTILE_UI = [
    ("/estimate", {"micro_batch": 1e30}, ("Micro-batch: 1e+30 is out of range", "from 1 to 65,536")),
    ("/estimate", {"micro_batch": 10**30}, ("Micro-batch:", "out of range", "65,536")),
    ("/estimate", {"micro_batch": 10**7}, ("Micro-batch: 1e+07 is out of range",)),
    ("/estimate", {"micro_batch": 1e308}, ("Micro-batch:", "out of range")),
    ("/estimate", {"lora_rank": 10**19}, ("LoRA rank", "from 1 to 16,384")),
    ("/estimate", {"lora_rank": 10**30}, ("LoRA rank", "from 1 to 16,384")),
    ("/estimate", {"lora_rank": 1e308}, ("LoRA rank", "from 1 to 16,384")),
    ("/estimate", {"seq_len": 1e308}, ("Sequence length:", "out of range")),
    ("/estimate", {"grad_accum": 10**30}, ("Gradient accumulation:", "out of range")),
    ("/estimate", {"max_steps": 1e308}, ("Max steps (0: run the epochs):", "out of range")),
    ("/estimate", {"epochs": 1e308}, ("Epochs:", "out of range")),
    ("/estimate", {"learning_rate": 1e308}, ("Learning rate:", "out of range")),
    ("/estimate", {"ewc_lambda": 1e308}, ("EWC strength:", "out of range")),
    ("/estimate", {"lora_alpha": 1e308}, ("LoRA alpha:", "out of range")),
    ("/recommend", {"max_steps": 1e30}, ("Max steps (0: run the epochs):", "out of range")),
    ("/recommend", {"num_gpus": 10**7}, ("Number of GPUs:", "out of range")),
    ("/readvise", {"micro_batch": 10**7}, ("Micro-batch:", "out of range")),
    ("/readvise", {"lora_rank": 10**19}, ("LoRA rank", "from 1 to 16,384")),
    ("/readvise", {"lora_rank": 10**30}, ("LoRA rank", "from 1 to 16,384")),
]


def _timed_predict(client, endpoint: str, arguments: dict):
    """(result or the AppError raised, seconds); gives up (fails) after GIVE_UP_SECONDS."""
    from gradio_client.exceptions import AppError

    began = time.monotonic()
    job = client.submit(**arguments, api_name=endpoint)
    try:
        outcome = job.result(timeout=GIVE_UP_SECONDS)
    except AppError as exc:
        outcome = exc
    return outcome, time.monotonic() - began


@pytest.mark.parametrize("endpoint, arguments, expect", HOSTILE_UI,
                         ids=[f"{e[1:]}-{name}={float(value):g}" for e, a, _ in HOSTILE_UI for name, value in a.items()])
def test_ui_hostile_numbers_answer_at_once(demo_app, endpoint, arguments, expect):
    from gradio_client.exceptions import AppError

    ordinary, ordinary_seconds = _timed_predict(demo_app, endpoint, SEVEN_B)
    assert not isinstance(ordinary, AppError), ordinary
    outcome, seconds = _timed_predict(demo_app, endpoint, {**SEVEN_B, **arguments})
    assert isinstance(outcome, AppError), f"accepted: {outcome!r:.300}"
    message = str(outcome)
    assert "Traceback" not in message and "This is a bug" not in message, message
    for text in expect:
        assert text in message, f"{text!r} not in {message!r}"
    assert seconds < ordinary_seconds + HANDLER_SECONDS, f"took {seconds:.2f}s (an ordinary request: {ordinary_seconds:.2f}s)"


# -- the long tail: every refusal carries a message naming the field ------------------------------------------


def _raw(url: str, endpoint: str, data: list) -> tuple[str, Any]:
    """(event, payload) of one API call over plain HTTP, where the last event is "complete" or "error" and
    an error's payload is its message ("timeout" after MAX_SECONDS: a handler that never answers sends
    heartbeats forever). json.dumps writes NaN and Infinity, which gradio_client will not send."""
    import httpx

    started = httpx.post(f"{url}gradio_api/call/{endpoint}", content=json.dumps({"data": data}),
                         headers={"content-type": "application/json"}, timeout=30)
    assert started.status_code == 200, started.text
    deadline = time.monotonic() + MAX_SECONDS
    lines = []
    with httpx.stream("GET", f"{url}gradio_api/call/{endpoint}/{started.json()['event_id']}", timeout=60) as stream:
        incoming = stream.iter_lines()
        for line in incoming:
            lines.append(line)
            if line in ("event: complete", "event: error"):
                lines.append(next(incoming, ""))  # its data line
                break
            if time.monotonic() > deadline:
                return "timeout", None
    text = "\n".join(lines)
    event = [line[len("event: "):] for line in text.splitlines() if line.startswith("event: ")][-1]
    payload = json.loads([line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")][-1])
    return event, (payload or {}).get("error") if event == "error" else payload


BAD_NUMBERS = [None, "abc", [], {}, float("nan"), float("inf"), 1e308, 10**30]


def test_ui_every_bad_number_is_refused_with_a_message_naming_its_field(ui):
    from advisor import wizard

    url, client, _ = ui
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/estimate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    defaults = [p["parameter_default"] for p in params]
    labels = {p["parameter_name"]: p["label"] for p in params}
    numbers = [p["parameter_name"] for p in params if p["component"] == "Number"]
    # Every number box of the page, the advanced settings' included (optional numbers unset by default are text boxes).
    assert set(numbers) == set(wizard.NUMBER_LIMITS) - set(wizard.NUMBER_TEXT_WIDGETS) and len(numbers) >= 17, numbers
    assert _raw(url, "estimate", defaults)[0] == "complete"  # so each refusal below is the one field's doing
    unnamed = []
    for name in numbers:
        for value in BAD_NUMBERS:
            data = list(defaults)
            data[names.index(name)] = value
            event, message = _raw(url, "estimate", data)
            if value is None and name in wizard.OPTIONAL_WIDGETS:
                if event != "complete":  # an empty optional box means "not set"
                    unnamed.append((name, value, event, message))
                continue
            if event != "error" or not message or not (labels[name] in message or wizard.PLAN_WIDGETS[name] in message) \
                    or "Something went wrong" in message or "Traceback" in message:
                unnamed.append((name, value, event, message))
    assert not unnamed, "\n".join(map(repr, unnamed))


def test_ui_name_fields_refuse_what_is_not_a_name_at_once(ui):
    from gradio_client.exceptions import AppError

    _, client, _ = ui
    cases = [
        ("/model_info", {"model": 123}, ("model.name", "must be text", "123")),
        ("/estimate", {"model": 1e308}, ("model.name", "must be text")),
        ("/estimate", {"dataset": 123}, ("data.dataset", "must be text")),
        ("/profile", {"dataset": None, "model": "demo"}, ("data.dataset", "no dataset chosen")),
        ("/profile", {"dataset": 123, "model": "demo"}, ("data.dataset", "must be text")),
        ("/overlay", {"run_ids": [], "metric": None}, ("metric", "pick a metric")),
        ("/overlay", {"run_ids": [], "metric": 5}, ("metric", "pick a metric")),
    ]
    for endpoint, arguments, expect in cases:
        began = time.monotonic()
        with pytest.raises(AppError) as refused:
            client.predict(**arguments, api_name=endpoint)
        assert time.monotonic() - began < 10, (endpoint, arguments)  # no hub lookups for a non-name
        message = str(refused.value)
        assert "Something went wrong" not in message, (endpoint, arguments, message)
        for text in expect:
            assert text in message, (endpoint, arguments, message)


def test_ui_upload_of_a_file_that_was_not_uploaded_is_refused_with_a_message(ui, tmp_path):
    url, _, work = ui
    runs = work / "runs"
    (runs / "plain.jsonl").write_text('{"text": "server file"}\n')
    (runs / "evil.jsonl").symlink_to("/etc/passwd")
    (tmp_path / "outside.jsonl").symlink_to("/etc/passwd")
    planted = work / "gradio-tmp" / "planted" / "planted.jsonl"  # in Gradio's cache, but never sent to it
    planted.parent.mkdir(parents=True)
    planted.write_text('{"text": "planted"}\n')
    for path in (runs / "plain.jsonl", runs / "evil.jsonl", tmp_path / "outside.jsonl", planted,
                 "http://127.0.0.1:1/remote.jsonl"):
        event, message = _raw(url, "upload", [{"path": str(path), "meta": {"_type": "gradio.FileData"}}])
        assert event == "error" and message and "Traceback" not in message, (path, message)
    assert not [p for p in (runs / "_uploads").rglob("*") if p.name in ("plain.jsonl", "evil.jsonl", "outside.jsonl",
                                                                         "planted.jsonl", "remote.jsonl")]
    event, message = _raw(url, "upload", [{"path": str(planted), "meta": {"_type": "gradio.FileData"}}])
    assert "upload box" in message


def test_ui_upload_keeps_the_suffix_of_a_long_name(ui, tmp_path):
    from gradio_client import handle_file

    _, client, _ = ui
    source = tmp_path / ("a" * 240 + ".jsonl")
    source.write_text("".join(f'{{"text": "line {i}"}}\n' for i in range(5)))
    kept = client.predict(handle_file(str(source)), api_name="/upload")["value"]
    assert kept == "a" * 114 + ".jsonl"
    rows, _histogram = client.predict(dataset=kept, model="demo", api_name="/profile")
    assert dict((r[0], r[1]) for r in rows["data"])["examples"] == "5"


@pytest.mark.parametrize("name, value", [("micro_batch", 10**30), ("lora_rank", 1e308), ("seq_len", float("inf")),
                                         ("learning_rate", float("nan")), ("ewc_lambda", float("inf")),
                                         ("grad_accum", "many"), ("model", 123), ("dataset", ["a.jsonl"])])
def test_plan_from_widgets_refuses_what_no_widget_sends_naming_the_setting(name, value):
    from advisor import wizard
    from advisor.errors import TunewiseError

    began = time.monotonic()
    with pytest.raises(TunewiseError) as refused:
        wizard.plan_from_widgets({name: value})
    assert time.monotonic() - began < 1
    assert refused.value.field == wizard.PLAN_WIDGETS[name] and str(refused.value).startswith(wizard.PLAN_WIDGETS[name])
