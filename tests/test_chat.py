"""Chat with the tuned model (trainer.chat): the prompt through the run's chat template, a reply streamed
token by token through the wizard's API, the time bound, the demo's refusal of other models.

One tiny LoRA run is trained for the module (a real run directory with its saved tokenizer); the API
test drives a real `python app.py` on that runs folder with gradio_client.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import TINY_CHAT_TEMPLATE, start_app, stop_app, tiny_plan


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """(runs folder, run id) of a finished 8-step LoRA run of the tiny model on its chat data."""
    from trainer import supervisor

    runs = tmp_path_factory.mktemp("chat-runs")
    plan = tiny_plan(tiny_model_dir, tiny_data_dir, {"training.max_steps": 12})
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        run_id = supervisor.launch(plan, runs)
        status = supervisor.wait(run_id, timeout=300, runs_dir=runs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert status.state == "finished", status
    return runs, run_id


def test_the_prompt_goes_through_the_chat_template_with_the_system_prompt_and_history(tiny_model_dir):
    from transformers import AutoTokenizer

    from trainer.chat import chat_prompt_ids, clean_history

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    history = clean_history([{"role": "user", "content": [{"type": "text", "text": "What colour is the sky?"}]},
                             {"role": "assistant", "content": "The sky is blue."},
                             {"role": "user", "content": "And the leaf?"}])
    ids = chat_prompt_ids(tokenizer, "Answer briefly.", history)
    text = tokenizer.decode(ids)
    assert text == ("<|system|>Answer briefly.<|end|><|user|>What colour is the sky?<|end|>"
                    "<|assistant|>The sky is blue.<|end|><|user|>And the leaf?<|end|><|assistant|>")
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    # Too little room: the oldest exchange goes, the system prompt and the last message stay.
    short = chat_prompt_ids(tokenizer, "Answer briefly.", history, room=len(ids) - 1)
    assert tokenizer.decode(short) == "<|system|>Answer briefly.<|end|><|user|>And the leaf?<|end|><|assistant|>"
    from advisor.errors import TunewiseError

    with pytest.raises(TunewiseError, match="shorten them or lower max new tokens"):
        chat_prompt_ids(tokenizer, "Answer briefly.", history, room=3)


def test_requests_are_bounded():
    from advisor.errors import TunewiseError
    from trainer.chat import MAX_HISTORY_MESSAGES, MAX_NEW_TOKENS_CAP, check_request

    said = [{"role": "user", "content": "hi"}]
    with pytest.raises(TunewiseError, match="chat.max_new_tokens"):
        check_request({"tuned": said, "max_new_tokens": MAX_NEW_TOKENS_CAP + 1})
    with pytest.raises(TunewiseError, match="chat.temperature"):
        check_request({"tuned": said, "temperature": -1})
    with pytest.raises(TunewiseError, match="write a message"):
        check_request({"tuned": [{"role": "assistant", "content": "hello"}]})
    with pytest.raises(TunewiseError, match="characters long"):
        check_request({"tuned": [{"role": "user", "content": "x" * 5000}]})
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(i)} for i in range(41)]
    assert len(check_request({"tuned": long})["tuned"]) == MAX_HISTORY_MESSAGES


def test_a_tiny_timeout_ends_with_a_message_and_kills_the_worker(tuned_run):
    from trainer.chat import stream_chat

    runs, run_id = tuned_run
    started = time.monotonic()
    events = list(stream_chat(runs / run_id, {"tuned": [{"role": "user", "content": "What colour is the sky?"}]},
                              timeout_s=0.5))
    assert time.monotonic() - started < 10
    assert events[-1]["event"] == "timeout" and "longer than 0.5 s" in events[-1]["message"]
    time.sleep(0.5)
    workers = [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(runs / run_id))]
    assert not workers, "the chat worker outlived its timeout"


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_demo_mode_chats_only_with_the_demo_models_runs(tuned_run):
    """The page refuses a run of another model in demo mode (even one of the visitor's own), and so does the
    worker on its own."""
    from advisor.errors import TunewiseError
    from app import _layout
    from handlers import AppConfig, Handlers
    from trainer.chat import stream_chat

    runs, run_id = tuned_run
    config = AppConfig(runs_dir=runs, demo_mode=True, uploads_dir=runs / "_uploads")
    handlers = Handlers(config, _layout(config))
    replies = handlers.on_chat(run_id, None, "What colour is the sky?", [], [], "", 0.0, 1.0, 8, False,
                               {"own": [run_id]})
    with pytest.raises(TunewiseError, match="only with runs of the demo model"):
        list(replies)
    with pytest.raises(TunewiseError, match="only with runs of the demo model"):
        list(stream_chat(runs / run_id, {"tuned": [{"role": "user", "content": "hi"}], "demo": True}, timeout_s=30))
    # Another visitor's run is refused before the model is even looked at.
    with pytest.raises(TunewiseError, match="not one of your runs"):
        list(handlers.on_chat(run_id, None, "hi", [], [], "", 0.0, 1.0, 8, False, {"own": []}))


@pytest.mark.slow
def test_the_reply_streams_through_the_wizards_api_with_the_base_beside_it(tuned_run, tmp_path):
    from gradio_client import Client

    runs, run_id = tuned_run
    proc, url = start_app(runs, "--no-warm-worker", log_path=tmp_path / "app.log")
    try:
        client = Client(url, verbose=False)
        client.predict(api_name="/runs")  # the history lists the run (the Run menu's choices), as the page does
        job = client.submit(run_id, None, "What colour is the sky number 3?", [], [], "Answer briefly.", 0.0, 1.0,
                            24, True, api_name="/chat")
        updates = list(job)
        message, tuned, base, note = job.outputs()[-1]
        base = base["value"]  # (an update that also shows the base model's chat)
    finally:
        stop_app(proc)
    assert message == ""
    assert [m["role"] for m in tuned] == ["user", "assistant"] and [m["role"] for m in base] == ["user", "assistant"]
    assert _text(tuned[0]) == "What colour is the sky number 3?"
    reply, base_reply = _text(tuned[1]), _text(base[1])
    assert reply and base_reply and reply != base_reply, (reply, base_reply)
    # Streamed: the reply grew over several updates before the last one.
    partial = {_text(update[1][1]) for update in job.outputs() if len(update[1]) == 2}
    assert len(updates) > 3 and len(partial) > 2, partial
    assert "tuned: " in note and "first after" in note


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def _serving_workers(run_dir: Path) -> list[str]:
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, str(run_dir))
            and _cmdline_has(pid, "--serve")]


def test_the_next_message_reuses_the_loaded_worker_until_it_idles_out_or_is_closed(tuned_run, monkeypatch):
    """The first reply starts the run's chat worker (imports, model loading); the next ones go to the same
    process with the models loaded. A prompt that cannot fit is refused without losing the worker; an idle
    worker exits by itself and the next message starts a fresh one; close_sessions (a launch, a delete)
    ends it."""
    from trainer import chat

    runs, run_id = tuned_run
    run_dir = runs / run_id
    chat.close_sessions()
    ask = {"tuned": [{"role": "user", "content": "What colour is the sky?"}], "temperature": 0.0, "max_new_tokens": 6}
    first = list(chat.stream_chat(run_dir, ask, timeout_s=120))
    assert first[-1]["event"] == "end" and first[-1]["reused"] is False and first[-1]["load_s"] > 0, first[-1]
    (worker,) = _serving_workers(run_dir)
    second = list(chat.stream_chat(run_dir, ask, timeout_s=120))
    assert second[-1]["event"] == "end" and second[-1]["reused"] is True and second[-1]["load_s"] == 0, second[-1]
    assert _serving_workers(run_dir) == [worker]
    # The same question, greedy: the same answer from the kept models.
    assert [e["text"] for e in first if e["event"] == "done"] == [e["text"] for e in second if e["event"] == "done"]
    # Too long for the model's context at this reply length: refused, and the worker stays for the next one.
    huge = {**ask, "tuned": [{"role": "user", "content": "sky " * 900}], "max_new_tokens": 200}
    refused = list(chat.stream_chat(run_dir, huge, timeout_s=120))
    assert refused[-1]["event"] == "error" and "shorten them" in refused[-1]["message"], refused[-1]
    assert list(chat.stream_chat(run_dir, ask, timeout_s=120))[-1]["reused"] is True
    assert _serving_workers(run_dir) == [worker]
    assert chat.close_sessions(run_dir) == 1
    time.sleep(0.5)
    assert _serving_workers(run_dir) == []

    # An idle worker exits by itself; the next message starts a fresh one.
    monkeypatch.setattr(chat, "SESSION_IDLE_S", 1.0)
    assert list(chat.stream_chat(run_dir, ask, timeout_s=120))[-1]["event"] == "end"
    deadline = time.monotonic() + 30
    while _serving_workers(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _serving_workers(run_dir) == [], "the idle chat worker did not exit"
    again = list(chat.stream_chat(run_dir, ask, timeout_s=120))
    assert again[-1]["event"] == "end" and again[-1]["reused"] is False, again[-1]
    # A message that reaches a worker just as its idle time runs out (it is leaving) goes to a new one.
    monkeypatch.setattr(chat, "SESSION_IDLE_S", 0.05)
    for _ in range(2):
        reply = list(chat.stream_chat(run_dir, ask, timeout_s=120))
        assert reply[-1]["event"] == "end", reply[-1]
    chat.close_sessions()
