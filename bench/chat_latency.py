"""Benchmark: how long the chat tab waits for the tuned model's first token, on the demo model.

    python bench/chat_latency.py [--rounds 3] [--max-new-tokens 48] [--no-write]

Trains a short LoRA SFT run of the demo model on demo-sft (or takes `--run RUN_DIR`), then, `--rounds`
times, closes the run's kept chat worker and asks `trainer.chat.stream_chat` for two replies in a row,
exactly as the page does: the first starts the worker, the next goes to it with the models loaded. Each
wait is split:

    request -> first token     what the user waits for: (first message) process start, torch /
                               transformers / PEFT imports, tokenizer, base and adapter loading; then
                               the prompt and the first token
      of which: loading        the worker's own load time (its "end" event's load_s; 0 when kept)
      of which: generation     request to the first decoded piece inside generate (first_token_s)
    reply                      the whole reply of --max-new-tokens tokens (greedy)
    with compare               the same request with the base model's reply streamed after it

Reports medians; writes bench/RESULTS.md under "chat_latency".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from advisor.plan import Plan  # noqa: E402
from bench.results import markdown_table, write_section  # noqa: E402

QUESTION = "Convert 2011-09-24 to day, month and year."


def train_demo_run(runs: Path) -> Path:
    from trainer import supervisor

    plan = Plan.from_dict({
        "stage": "sft", "model": {"name": "demo"}, "data": {"dataset": "demo-sft", "eval_fraction": 0.0},
        "method": {"method": "lora", "precision": "fp32"},
        "training": {"max_steps": 10, "micro_batch": 8, "seq_len": 128, "logging_steps": 5, "seed": 0},
        "forgetting": {"monitor": False}})
    run_id = supervisor.launch(plan, runs)
    status = supervisor.wait(run_id, timeout=600, runs_dir=runs)
    if status.state != "finished":
        raise SystemExit(f"the demo run ended {status.state}")
    return runs / run_id


def one_reply(run_dir: Path, max_new_tokens: int, compare: bool) -> dict:
    from trainer.chat import stream_chat

    said = [{"role": "user", "content": QUESTION}]
    request = {"tuned": said, "base": said if compare else None, "temperature": 0.0, "max_new_tokens": max_new_tokens}
    started = time.monotonic()
    first = done = None
    worker = {}
    for event in stream_chat(run_dir, request, timeout_s=300):
        kind = event.get("event")
        if kind == "token" and first is None:
            first = time.monotonic() - started
        elif kind == "done" and event.get("model") == "tuned":
            done = time.monotonic() - started
            worker["first_token_s"] = event.get("first_token_s")
            worker["new_tokens"] = event.get("new_tokens")
        elif kind == "end":
            worker["load_s"] = event.get("load_s")
        elif kind in ("error", "timeout"):
            raise SystemExit(f"chat {kind}: {event.get('message')}")
    return {"first": first, "reply": done, "total": time.monotonic() - started, **worker}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--run", help="a finished run directory to chat with (default: train a demo run)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = parser.parse_args(argv)

    from trainer.chat import close_sessions

    def pair(run_dir: Path, compare: bool) -> tuple[dict, dict]:
        close_sessions()
        return one_reply(run_dir, args.max_new_tokens, compare), one_reply(run_dir, args.max_new_tokens, compare)

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(args.run) if args.run else train_demo_run(Path(scratch) / "runs")
        plain = [pair(run_dir, compare=False) for _ in range(args.rounds)]
        compared = [pair(run_dir, compare=True) for _ in range(args.rounds)]
        close_sessions()

    def med(rows: list[dict], key: str) -> str:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        return f"{statistics.median(values):.2f}" if values else "-"

    def cells(key: str) -> list[str]:
        return [med([first for first, _ in plain], key), med([kept for _, kept in plain], key),
                med([first for first, _ in compared], key), med([kept for _, kept in compared], key)]

    rows = [
        ["request -> first token (what the user waits for)", *cells("first")],
        ["  of which: worker start, imports and model loading", *cells("load_s")],
        ["  of which: prompt to first token inside generate", *cells("first_token_s")],
        [f"tuned reply complete ({plain[0][0].get('new_tokens')} new tokens)", *cells("reply")],
        ["request -> stream ended", *cells("total")],
    ]
    table = markdown_table(["seconds (median of %d)" % args.rounds, "first message", "next message",
                            "first, with compare (base too)", "next, with compare"], rows)
    body = (f"Chat tab on the demo model (a 10-step LoRA run on demo-sft), greedy, {args.max_new_tokens} new tokens at "
            f"most; the run's chat worker (`trainer.chat --serve`) starts for the first message and is kept for the "
            f"next ones:\n\n{table}\n\nThe first message waits on the worker's start (imports and loading); the "
            "next ones only on generation.")
    print(body)
    if not args.no_write:
        print(f"\nwrote {write_section('chat_latency', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
