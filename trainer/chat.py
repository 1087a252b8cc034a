"""Chat with a run's tuned model, and its base beside it: `python -m trainer.chat RUN_DIR [--step S]`.

The page's chat tab calls `stream_chat(run_dir, request, timeout_s, step)`, a generator that starts this
module as a worker process for one reply (torch and transformers never load in the page's process) and
yields what it prints, one JSON object per line, as the tokens come:

    {"event": "start", "model": "tuned", "label": "output", "prompt_tokens": 41}
    {"event": "token", "model": "tuned", "text": " The"}          one per decoded piece (TextIteratorStreamer)
    {"event": "done", "model": "tuned", "text": "...", "new_tokens": 12, "first_token_s": 0.05}
    ...the same for "base" when the request compares...
    {"event": "end", "load_s": 1.9}

The request (JSON on the worker's stdin) is {"tuned": [messages], "base": [messages] or null, "system":
text, "temperature", "top_p", "max_new_tokens", "demo": bool}: each model gets its own conversation
so far (the base model sees its own earlier answers). The tuned model is the run's output (or a pipeline
step's, or the newest complete checkpoint while there is no output: `trainer.rundir.final_output`), on
the base it was trained on. The prompt is built with the chat template the run trained with: the
tokenizer saved with the tuned model (the SFT stage saves it in its output, the trainer in each
checkpoint), else the base model's (`trainer.models.load_tokenizer`); both models get the prompt built
that way (`chat_prompt_ids`). A tokenizer without a chat template gets the turns as plain lines.

Bounds: at most `MAX_NEW_TOKENS_CAP` new tokens, `MAX_HISTORY_MESSAGES` earlier messages and
`MAX_MESSAGE_CHARS` per message; the oldest turns are dropped until the prompt and the reply fit the
model's context. `stream_chat` kills the worker's process group at `timeout_s` and yields a `timeout`
event. With `demo` the worker (and the page before it) serves only runs of the demo model.

Errors: the worker prints {"event": "error", "message": ...} and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from advisor.errors import TunewiseError
from trainer.procs import REPO_ROOT, child_env
from trainer.rundir import PLAN_FILE, final_output

MAX_NEW_TOKENS_CAP = 256
"""Longest reply a request may ask for (new tokens)."""
MAX_HISTORY_MESSAGES = 16
"""Earlier messages (user and assistant) a prompt keeps at most: the newest ones."""
MAX_MESSAGE_CHARS = 4000
"""Longest single message (characters); a longer one is refused."""
ROLES = ("user", "assistant")


def message_text(content) -> str:
    """The text of a chat message's content: a string, or Gradio's list of parts ({"type": "text", "text"})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def clean_history(messages) -> list[dict]:
    """Chat messages as [{"role", "content": str}], user and assistant only, the newest
    `MAX_HISTORY_MESSAGES` kept; TunewiseError naming the field for anything else."""
    if messages is None:
        return []
    if not isinstance(messages, (list, tuple)):
        raise TunewiseError("chat: the conversation must be a list of messages", field="chat")
    out = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise TunewiseError("chat: each message needs a role (user or assistant) and content", field="chat")
        text = message_text(message.get("content"))
        if len(text) > MAX_MESSAGE_CHARS:
            raise TunewiseError(f"chat: a message is {len(text):,} characters long; at most {MAX_MESSAGE_CHARS:,}",
                                field="chat")
        out.append({"role": message["role"], "content": text})
    return out[-MAX_HISTORY_MESSAGES:]


def chat_prompt_ids(tokenizer, system: str | None, messages: list[dict], room: int | None = None) -> list[int]:
    """Token ids of the prompt for the next assistant reply: the system prompt and the conversation through
    the tokenizer's chat template with the generation prompt added (as TRL renders a prompt in training), or
    plain "role: text" lines without a template. The oldest turns are dropped (the system prompt and the
    last message stay) until the prompt is at most `room` tokens; TunewiseError when even that is too long."""
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    turns = list(messages)
    while True:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(head + turns, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in head + turns) + "assistant:"
            ids = tokenizer(text)["input_ids"]
        ids = list(ids)
        if room is None or len(ids) <= room:
            return ids
        if len(turns) <= 1:
            raise TunewiseError(f"chat: the message and system prompt take {len(ids)} tokens, more than the "
                                f"{room} the model has room for with this reply length; shorten them or lower "
                                "max new tokens", field="chat")
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # drop the oldest exchange


# -- the page's side: one worker process per reply ----------------------------------------------------------


def check_request(request: dict) -> dict:
    """The request with its numbers checked and bounded (TunewiseError naming the setting otherwise)."""
    def number(name: str, low: float, high: float, default: float) -> float:
        value = request.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise TunewiseError(f"chat.{name}: {value!r} is outside {low:g} to {high:g}", field=f"chat.{name}")
        return value

    tuned = clean_history(request.get("tuned"))
    if not tuned or tuned[-1]["role"] != "user" or not tuned[-1]["content"].strip():
        raise TunewiseError("chat: write a message first", field="chat")
    base = request.get("base")
    system = request.get("system") or ""
    if not isinstance(system, str) or len(system) > MAX_MESSAGE_CHARS:
        raise TunewiseError(f"chat.system: the system prompt must be text of at most {MAX_MESSAGE_CHARS:,} characters",
                            field="chat.system")
    return {"tuned": tuned, "base": clean_history(base) if base is not None else None, "system": system,
            "temperature": float(number("temperature", 0.0, 2.0, 0.7)), "top_p": float(number("top_p", 0.05, 1.0, 0.95)),
            "max_new_tokens": int(number("max_new_tokens", 1, MAX_NEW_TOKENS_CAP, 64)),
            "demo": bool(request.get("demo"))}


def check_demo_run(run_dir: Path) -> None:
    """Public demo: only runs of the demo model are served (TunewiseError naming the run otherwise)."""
    from advisor.plan import Plan, is_demo_model

    plan = Plan.load(Path(run_dir) / PLAN_FILE)
    if not is_demo_model(plan.model.name):
        raise TunewiseError(f"run: the public demo chats only with runs of the demo model; {Path(run_dir).name} "
                            f"trained {plan.model.name}", field="run")


def stream_chat(run_dir: Path, request: dict, timeout_s: float, step: str | None = None) -> Iterator[dict]:
    """The worker's events for one reply (see the module doc), as they arrive. At `timeout_s` the worker's
    process group is killed and a {"event": "timeout", "message"} event ends the stream; a worker that
    fails gives {"event": "error", "message"}. Checks the request and that the run has a model first."""
    request = check_request(request)
    if request["demo"]:
        check_demo_run(run_dir)
    final_output(run_dir, step)  # nothing to chat with, or no such step: say so before loading torch
    command = [sys.executable, "-m", "trainer.chat", str(run_dir)] + (["--step", str(step)] if step else [])
    started = time.monotonic()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(REPO_ROOT), env=child_env(), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    errors: list[str] = []

    def read_out() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_out, daemon=True).start()
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    try:
        proc.stdin.write(json.dumps(request))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    deadline = started + timeout_s
    timed_out = {"event": "timeout", "message": f"the reply took longer than {timeout_s:g} s and was cut off there; "
                                                "ask for fewer new tokens"}
    try:
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                yield timed_out
                return
            if line is None:  # the worker closed its output without an end event
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event
                if event.get("event") in ("end", "error"):
                    return
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            yield timed_out
            return
        last = ([line.strip() for line in errors if line.strip()] or [f"exit code {proc.returncode}"])[-1]
        yield {"event": "error", "message": f"chat: the model process failed: {last}"}
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


# -- the worker ----------------------------------------------------------------------------------------------


def _say(**event) -> None:
    print(json.dumps(event), flush=True)


def chat_tokenizer(tuned, plan):
    """The tokenizer the run trained with: the one saved beside the tuned model when it has a chat template,
    else the base model's (`trainer.models.load_tokenizer`, which handles an adapter's base)."""
    from transformers import AutoTokenizer

    from trainer.models import load_tokenizer

    saved = Path(tuned.path)
    if (saved / "tokenizer_config.json").is_file() or (saved / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(saved), trust_remote_code=plan.model.trust_remote_code)
        if getattr(tokenizer, "chat_template", None):
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            return tokenizer
    return load_tokenizer(plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--step", default=None, help="a pipeline's step (default: its final policy)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    run_dir = Path(args.run_dir)
    try:
        request = check_request(json.loads(sys.stdin.read() or "{}"))
        if request["demo"]:
            check_demo_run(run_dir)
        tuned = final_output(run_dir, args.step)
    except (TunewiseError, ValueError) as exc:
        _say(event="error", message=str(exc))
        return 2

    import torch
    from transformers import AutoModelForCausalLM, TextIteratorStreamer

    from advisor.plan import Plan
    from advisor.profile import config_max_length
    from trainer.models import base_of_adapter, resolve_model_path

    plan = Plan.load(run_dir / PLAN_FILE)
    trust = plan.model.trust_remote_code
    tokenizer = chat_tokenizer(tuned, Plan.load(tuned.run_dir / PLAN_FILE))
    base_name = resolve_model_path(plan.model.name)
    load = dict(dtype=torch.float32, trust_remote_code=trust)
    base = AutoModelForCausalLM.from_pretrained(base_name, **load).eval() if request["base"] is not None else None
    adapter_base = base_of_adapter(tuned.path)
    if adapter_base is not None:
        from peft import PeftModel

        # A pipeline's PPO or DPO adapter sits on the merged SFT model, not on the plan's base; the page's base
        # model is not wrapped, so the adapter gets a fresh copy of its own base.
        under = AutoModelForCausalLM.from_pretrained(resolve_model_path(adapter_base), **load)
        model = PeftModel.from_pretrained(under, str(tuned.path)).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(tuned.path), **load).eval()
    context = config_max_length(tuned.path) or config_max_length(base_name) or 2048  # (an adapter has no config.json)
    room = max(context - request["max_new_tokens"], 1)
    load_s = time.monotonic() - began

    def reply(which: str, chat_model, messages: list[dict], label: str) -> None:
        try:
            ids = chat_prompt_ids(tokenizer, request["system"], messages, room)
        except TunewiseError as exc:
            _say(event="error", model=which, message=str(exc))
            raise SystemExit(2) from None
        _say(event="start", model=which, label=label, prompt_tokens=len(ids))
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = request["temperature"] > 0
        kwargs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=request["max_new_tokens"], do_sample=sampling, streamer=streamer,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        if sampling:
            kwargs.update(temperature=request["temperature"], top_p=request["top_p"])
        counted: dict = {}

        def generate() -> None:
            with torch.no_grad():
                counted["ids"] = chat_model.generate(**kwargs)

        started = time.monotonic()
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        text, first = "", None
        for piece in streamer:
            if not piece:
                continue
            if first is None:
                first = time.monotonic() - started
            text += piece
            _say(event="token", model=which, text=piece)
        worker.join()
        new_tokens = int(counted["ids"].shape[1] - len(ids)) if "ids" in counted else None
        _say(event="done", model=which, text=text.strip(), new_tokens=new_tokens,
             first_token_s=round(first, 4) if first is not None else None, reply_s=round(time.monotonic() - started, 4))

    torch.manual_seed(0)
    reply("tuned", model, request["tuned"], tuned.label)
    if base is not None:
        torch.manual_seed(0)
        reply("base", base, request["base"], "base")
    _say(event="end", load_s=round(load_s, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
