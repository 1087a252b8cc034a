"""Shared pytest fixtures: a tiny model, tiny datasets, a runs folder, a plan factory.

Everything here is built locally in a temporary directory (no network, no
Hub), small enough that a training step on the CPU takes milliseconds:

- `tiny_model_dir` (session): a random 2-layer Llama (hidden size 64, ~70k
  parameters) saved with a byte-level BPE tokenizer whose chat template has
  `{% generation %}` markers (so assistant-only loss works) and a pad token.
- `tiny_data_dir` (session): small JSONL files in every format the trainer
  reads: `text.jsonl`, `prompt_completion.jsonl`, `messages.jsonl`,
  `preference.jsonl`, `original.jsonl` (original-domain text for the
  forgetting monitor). The task is learnable in a few steps: the model
  quickly memorises the repeated answer patterns, so losses fall.
- `demo_model_dir` (session): the bundled `assets/demo-model/` (skips the
  test when it has not been built).
- `poisoned_model_dir` (session): the tiny model with one infinite weight, as
  a damaged download would be (`poisoned_copy` makes one from any model).
- `runs_dir`: an empty runs folder for this test, also set as
  `$TUNEWISE_RUNS_DIR` so code using the default runs folder lands there.
- `make_plan(**overrides)`: a `Plan` for the tiny model and data with small,
  fast training settings; keyword overrides use dotted names with `__`
  instead of dots, e.g. `make_plan(method__method="qlora",
  training__max_steps=6)`, or pass a dict as `overrides={"method.method": ...}`.

The builders are plain functions (`build_tiny_model`, `write_tiny_datasets`,
`tiny_plan`) so module-scoped fixtures, benchmarks and scripts can call them too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from advisor.plan import Plan

REPO_ROOT = Path(__file__).resolve().parent.parent

#: A chat template with generation markers around assistant replies (what TRL's
#: assistant_only_loss needs); the end-of-turn token sits inside the markers so the
#: model learns to stop.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TINY_SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
_THINGS = ["apple", "sky", "leaf", "sun", "coal", "snow", "plum", "carrot"]


def tiny_examples(count: int = 48, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs: "What colour is the apple?" -> "The apple is red." (deterministic)."""
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        thing = _THINGS[index % len(_THINGS)]
        colour = _COLOURS[index % len(_COLOURS)]
        pairs.append((f"What colour is the {thing} number {rng.randint(1, 9)}?", f"The {thing} is {colour}."))
    return pairs


def write_tiny_datasets(directory: str | Path, count: int = 48) -> dict[str, Path]:
    """Write one small JSONL file per format into `directory`; return {format: path}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = tiny_examples(count)
    rows = {
        "text": [{"text": f"{q} {a}"} for q, a in pairs],
        "prompt_completion": [{"prompt": q, "completion": " " + a} for q, a in pairs],
        "messages": [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
        ],
        "preference": [
            {"prompt": q, "chosen": " " + a, "rejected": " " + a.replace("The", "No, the").replace(".", "?")}
            for q, a in pairs
        ],
        "original": [{"text": f"The {t} lives in a small town near the {c} hills."} for t, c in zip(_THINGS, _COLOURS)] * 4,
    }
    paths = {}
    for name, records in rows.items():
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        paths[name] = path
    return paths


def build_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Save a random tiny Llama and its tokenizer to `directory` (about 0.3 MB); return the path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = [f"{q} {a}" for q, a in tiny_examples(200)] + [
        f"The {t} lives in a small town near the {c} hills. No, the {t} is {c}?" for t in _THINGS for c in _COLOURS
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=TINY_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=256,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return directory


def poisoned_copy(model_dir: str | Path, directory: str | Path,
                  tensor: str = "model.layers.0.mlp.down_proj.weight") -> Path:
    """Copy a saved model with one weight of `tensor` set to infinity (what a damaged download or checkpoint
    looks like): every forward pass through it gives NaN, so training on it must fail, not finish."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    shutil.copytree(model_dir, directory)
    weights = load_file(directory / "model.safetensors")
    weights[tensor][0, 0] = float("inf")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    assert not torch.isfinite(load_file(directory / "model.safetensors")[tensor]).all()
    return directory


@pytest.fixture(scope="session")
def poisoned_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with one infinite weight (see `poisoned_copy`)."""
    return poisoned_copy(tiny_model_dir, tmp_path_factory.mktemp("poisoned") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama with tokenizer and chat template, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A folder with text / prompt_completion / messages / preference / original JSONL files."""
    directory = tmp_path_factory.mktemp("tiny-data")
    write_tiny_datasets(directory)
    return directory


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The bundled offline demo model (assets/demo-model); the test is skipped if it was not built."""
    from advisor.plan import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "config.json").is_file():
        pytest.skip("assets/demo-model is not built (run `tunewise build-demo`)")
    return DEMO_MODEL_DIR


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    """An empty runs folder for this test, also exported as $TUNEWISE_RUNS_DIR."""
    path = tmp_path / "runs"
    path.mkdir()
    monkeypatch.setenv("TUNEWISE_RUNS_DIR", str(path))
    return path


def tiny_plan_dict(model_dir: Path, data_dir: Path) -> dict:
    """The plan settings the tiny fixtures train with (fast, deterministic, CPU)."""
    return {
        "stage": "sft",
        "model": {"name": str(model_dir)},
        "data": {"dataset": str(Path(data_dir) / "messages.jsonl"), "eval_fraction": 0.0},
        "method": {"method": "lora", "precision": "fp32", "lora_rank": 8, "lora_targets": ["all-linear"], "lora_dropout": 0.0},
        "training": {
            "learning_rate": 5e-3,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "max_steps": 8,
            "micro_batch": 4,
            "grad_accum": 1,
            "seq_len": 64,
            "logging_steps": 1,
            "seed": 0,
        },
        "forgetting": {"monitor": False, "original_data": str(Path(data_dir) / "original.jsonl")},
        "hardware": {"device": "cpu"},
    }


def tiny_plan(model_dir: Path, data_dir: Path, overrides: dict | None = None):
    """`Plan` for the tiny model and data, with dotted overrides ({"method.method": "full"})."""
    from advisor.plan import Plan

    plan = Plan.from_dict(tiny_plan_dict(model_dir, data_dir))
    return plan.with_overrides(overrides) if overrides else plan


@pytest.fixture
def make_plan(tiny_model_dir, tiny_data_dir):
    """Factory: `make_plan(training__max_steps=4, overrides={"method.method": "full"})` -> Plan."""

    def factory(overrides: dict | None = None, **dunder) -> Plan:
        merged = {key.replace("__", "."): value for key, value in dunder.items()}
        merged.update(overrides or {})
        return tiny_plan(tiny_model_dir, tiny_data_dir, merged)

    return factory


@pytest.fixture(autouse=True)
def _quiet_training_environment(monkeypatch):
    """Keep tests offline and quiet: no Hub calls, no tokenizer fork warnings, fewer threads."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    if "OMP_NUM_THREADS" not in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")


# -- helpers for tests that drive real processes ---------------------------------------------------


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll `predicate` until it returns something truthy (returned); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on every address, picked below the kernel's ephemeral range: a port the kernel hands out
    (bind to 0) is also what it hands the next outgoing connection as its source port, so a daemon that
    binds it a second later can find it taken (CI saw slurmctld fail with "Address already in use")."""
    low, _ = _ephemeral_range()
    ports = [port for port in range(max(1024, low - 12000), low) if port not in _HANDED_OUT]
    random.SystemRandom().shuffle(ports)  # not the global generator, which a test may have seeded
    for port in ports[:200]:
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)  # two calls in a row (slurmctld's and slurmd's ports) never get the same one
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(runs_dir: Path, *extra: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start `python app.py` on a free port in its own session; return the process and its URL once it
    serves a page."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), "--port", str(port), "--runs-dir",
                             str(runs_dir), *extra],
                            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 150
    # Gradio asks for its own page once it listens, and exits when that takes over 3 s; a page asked for at the
    # same moment doubles the render time on a loaded machine. So ask only once its check has passed (it then
    # prints the share hint), or after 90 s whatever the log says.
    quiet_until = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app.py exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        if time.time() < quiet_until and "To create a public link" not in Path(log_path).read_text(errors="replace"):
            time.sleep(0.3)
            continue
        try:
            # (a first render of this page can take seconds on a busy 2-core machine: a short timeout would
            # only pile up renders that are never read)
            with urllib.request.urlopen(url, timeout=20) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    stop_app(proc)
    raise AssertionError(f"app.py did not serve within 150 s:\n{Path(log_path).read_text()[-3000:]}")


def stop_app(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop an app started by `start_app` (its whole process group), killing it after 15 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
