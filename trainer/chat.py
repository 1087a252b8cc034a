"""Chat with a run's tuned model, and its base beside it: `python -m trainer.chat RUN_DIR [--step S]`.

The page's chat tab calls `stream_chat(run_dir, request, timeout_s, step)`, a generator that sends the
request to this module's worker process for the run (`--serve`: started for the first reply and kept, so
later replies skip the imports and the model loading; torch and transformers never load in the page's
process) and yields what it prints, one JSON object per line, as the tokens come:

    {"event": "start", "model": "tuned", "label": "output", "prompt_tokens": 41}
    {"event": "token", "model": "tuned", "text": " The"}          one per decoded piece (TextIteratorStreamer)
    {"event": "done", "model": "tuned", "text": "...", "new_tokens": 12, "first_token_s": 0.05}
    ...the same for "base" when the request compares...
    {"event": "end", "load_s": 1.9, "reused": false, "device": "cpu"}   load_s: this reply's loading (0 when kept)

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

Placement: on the GPU in 16-bit when CUDA is there, else on the CPU in float32
(`trainer.models.inference_placement`).

Errors: the worker prints {"event": "error", "message": ...}; with "fatal": true it exits (2), otherwise
(a request it refuses, a prompt that cannot fit) it waits for the next request.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import queue
import select
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


# A kept worker per run (and pipeline step, and model folder): the first reply pays the imports and the model
# loading, the next ones only generate. A worker exits by itself after SESSION_IDLE_S without a request, or
# when the page's process goes (its stdin closes); the page keeps at most MAX_SESSIONS, the least recently
# used going first, and closes a run's workers before a launch (they would hold its GPU memory) or a delete.
SESSION_IDLE_S = 300.0
"""Seconds a chat worker waits for the next message before it exits (freeing the model's memory)."""
MAX_SESSIONS = 2
"""Chat workers the page keeps at once (each holds its models in memory)."""


class _Session:
    """One kept worker: `python -m trainer.chat RUN_DIR --serve`, one request per line on its stdin."""

    def __init__(self, run_dir: Path, step: str | None):
        command = [sys.executable, "-m", "trainer.chat", str(run_dir), "--serve", "--idle", f"{SESSION_IDLE_S:g}"]
        command += ["--step", str(step)] if step else []
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=str(REPO_ROOT), env=child_env(), start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.lock = threading.Lock()  # one reply at a time
        self.used = time.monotonic()
        self.replies = 0
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.errors.append(line)
            del self.errors[:-40]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


_SESSIONS: dict[tuple, _Session] = {}
_SESSIONS_LOCK = threading.Lock()


def _session_for(run_dir: Path, step: str | None, tuned_path: Path) -> _Session:
    """The kept worker for this run, step and model folder (a newer checkpoint or output is another
    folder, so a new worker), started when there is none or it has exited."""
    key = (str(Path(run_dir).resolve()), step or "", str(tuned_path))
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is not None and session.alive():
            return session
        stale = [k for k, other in _SESSIONS.items()
                 if not other.alive() or (k[:2] == key[:2] and not other.lock.locked())]
        for k in stale:
            _SESSIONS.pop(k).close()
        while len(_SESSIONS) >= MAX_SESSIONS:
            idle = [k for k, other in _SESSIONS.items() if not other.lock.locked()]
            if not idle:
                break  # every kept worker is answering: this one is an extra until the next call
            _SESSIONS.pop(min(idle, key=lambda k: _SESSIONS[k].used)).close()
        session = _SESSIONS[key] = _Session(run_dir, step)
        return session


def close_sessions(run_dir: Path | None = None) -> int:
    """Close the kept chat workers (of one run, or all): before a launch, whose GPU they would share, or when
    the run is deleted. A worker answering right now is closed too (its reply ends with an error). Returns
    how many were closed."""
    wanted = None if run_dir is None else str(Path(run_dir).resolve())
    with _SESSIONS_LOCK:
        keys = [k for k in _SESSIONS if wanted is None or k[0] == wanted]
        sessions = [_SESSIONS.pop(k) for k in keys]
    for session in sessions:
        session.close()
    return len(sessions)


atexit.register(close_sessions)


def stream_chat(run_dir: Path, request: dict, timeout_s: float, step: str | None = None) -> Iterator[dict]:
    """The worker's events for one reply (see the module doc), as they arrive, from the run's kept worker
    (started for the first reply). At `timeout_s` the worker's process group is killed and a
    {"event": "timeout", "message"} event ends the stream; a worker that fails gives {"event": "error",
    "message"}. Checks the request and that the run has a model first."""
    request = check_request(request)
    if request["demo"]:
        check_demo_run(run_dir)
    tuned = final_output(run_dir, step)  # nothing to chat with, or no such step: say so before loading torch
    started = time.monotonic()
    deadline = started + timeout_s
    timed_out = {"event": "timeout", "message": f"the reply took longer than {timeout_s:g} s and was cut off there; "
                                                "ask for fewer new tokens"}
    for last_try in (False, True):
        session = _session_for(Path(run_dir), step, tuned.path)
        if not session.lock.acquire(timeout=max(deadline - time.monotonic(), 0.001)):
            yield {**timed_out, "message": f"the model was still answering another message after {timeout_s:g} s; "
                                           "try again when it is done"}
            return
        outcome = yield from _reply_from(session, request, deadline, timed_out, last_try)
        if outcome != "left":
            return


def _reply_from(session: _Session, request: dict, deadline: float, timed_out: dict, last_try: bool):
    """One reply's events from `session` (whose lock the caller holds; released here). Returns "left" when
    the worker had left on its own before answering (its idle time ran out as the request came: a new worker
    answers, unless `last_try`), else None."""
    ended, answered = False, False
    try:
        try:
            session.proc.stdin.write(json.dumps(request) + "\n")
            session.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it exited (idle, or failed): its output ends, and the error below says why
        while True:
            try:
                line = session.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                yield timed_out
                return None
            if line is None:  # the worker closed its output: it exited
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                answered = True
                if event.get("event") in ("end", "error"):
                    ended = event.get("event") == "end" or not event.get("fatal")
                    session.replies += event.get("event") == "end"
                    yield event
                    return None
                yield event
        try:
            session.proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            yield timed_out
            return None
        if not answered and session.proc.returncode == 0 and not last_try:
            return "left"
        last = ([line.strip() for line in session.errors if line.strip()] or [f"exit code {session.proc.returncode}"])[-1]
        yield {"event": "error", "message": f"chat: the model process failed: {last}"}
        return None
    finally:
        session.used = time.monotonic()
        session.lock.release()
        if not ended:  # timed out, failed, left, or the page stopped reading mid-reply: not reused
            with _SESSIONS_LOCK:
                for key, other in list(_SESSIONS.items()):
                    if other is session:
                        _SESSIONS.pop(key)
            session.close()


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


class _Chatter:
    """The worker's models, loaded once: the tuned model on its first request, the base model on the first
    request that compares."""

    def __init__(self, run_dir: Path, step: str | None):
        import torch

        from advisor.plan import Plan
        from advisor.profile import config_max_length
        from trainer.models import inference_placement, resolve_model_path

        self.run_dir, self.step = run_dir, step
        self.tuned = final_output(run_dir, step)
        self.plan = Plan.load(run_dir / PLAN_FILE)
        self.tokenizer = chat_tokenizer(self.tuned, Plan.load(self.tuned.run_dir / PLAN_FILE))
        self.base_name = resolve_model_path(self.plan.model.name)
        self.dtype, self.device = inference_placement()
        self.load = dict(dtype=self.dtype, trust_remote_code=self.plan.model.trust_remote_code)
        self.context = config_max_length(self.tuned.path) or config_max_length(self.base_name) or 2048
        self.model = self._tuned_model()
        self.base = None
        self.torch = torch

    def _tuned_model(self):
        from transformers import AutoModelForCausalLM

        from trainer.models import base_of_adapter, resolve_model_path

        adapter_base = base_of_adapter(self.tuned.path)
        if adapter_base is not None:
            from peft import PeftModel

            # A pipeline's PPO or DPO adapter sits on the merged SFT model, not on the plan's base; the page's
            # base model is not wrapped, so the adapter gets a fresh copy of its own base.
            under = AutoModelForCausalLM.from_pretrained(resolve_model_path(adapter_base), **self.load)
            return PeftModel.from_pretrained(under, str(self.tuned.path)).to(self.device).eval()
        return AutoModelForCausalLM.from_pretrained(str(self.tuned.path), **self.load).to(self.device).eval()

    def base_model(self):
        if self.base is None:
            from transformers import AutoModelForCausalLM

            self.base = AutoModelForCausalLM.from_pretrained(self.base_name, **self.load).to(self.device).eval()
        return self.base

    def reply(self, which: str, chat_model, request: dict, messages: list[dict], label: str) -> bool:
        """Stream one model's reply as events; False (after an error event) when the prompt cannot fit."""
        from transformers import TextIteratorStreamer

        torch, tokenizer = self.torch, self.tokenizer
        room = max(self.context - request["max_new_tokens"], 1)
        try:
            ids = chat_prompt_ids(tokenizer, request["system"], messages, room)
        except TunewiseError as exc:
            _say(event="error", model=which, message=str(exc))
            return False
        _say(event="start", model=which, label=label, prompt_tokens=len(ids))
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = request["temperature"] > 0
        kwargs = dict(input_ids=torch.tensor([ids], device=self.device),
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
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
        return True

    def answer(self, request: dict, load_s: float, reused: bool) -> None:
        began = time.monotonic()
        base = self.base_model() if request["base"] is not None else None
        load_s += time.monotonic() - began
        self.torch.manual_seed(0)
        if not self.reply("tuned", self.model, request, request["tuned"], self.tuned.label):
            return
        if base is not None:
            self.torch.manual_seed(0)
            if not self.reply("base", base, request, request["base"], "base"):
                return
        _say(event="end", load_s=round(load_s, 3), reused=reused, device=self.device)


def _next_request(idle_s: float | None) -> str | None:
    """The next request line on stdin; None when stdin closed (the page went) or after `idle_s` without one."""
    if idle_s is not None:
        ready, _, _ = select.select([sys.stdin], [], [], idle_s)
        if not ready:
            return None
    line = sys.stdin.readline()
    return line or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--step", default=None, help="a pipeline's step (default: its final policy)")
    parser.add_argument("--serve", action="store_true",
                        help="keep the models loaded and answer one JSON request per line until stdin closes")
    parser.add_argument("--idle", type=float, default=SESSION_IDLE_S,
                        help="with --serve: exit after this many seconds without a request")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    chatter = None
    while True:
        line = _next_request(args.idle) if args.serve else (sys.stdin.read() or "{}")
        if line is None:
            return 0
        began = time.monotonic()
        try:
            request = check_request(json.loads(line))
            if request["demo"]:
                check_demo_run(run_dir)
            final_output(run_dir, args.step)
        except (TunewiseError, ValueError) as exc:
            _say(event="error", message=str(exc), fatal=not args.serve)
            if not args.serve:
                return 2
            continue
        reused = chatter is not None
        if chatter is None:
            try:
                chatter = _Chatter(run_dir, args.step)
            except Exception as exc:  # noqa: BLE001 (the page shows it; the worker cannot go on without a model)
                _say(event="error", message=f"chat: the model could not be loaded: {exc}", fatal=True)
                return 2
        chatter.answer(request, 0.0 if reused else time.monotonic() - began, reused)
        if not args.serve:
            return 0


if __name__ == "__main__":
    sys.exit(main())
