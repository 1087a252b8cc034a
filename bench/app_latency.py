"""How fast the wizard answers: `python app.py` to the first served page, and the launch click to the
first plotted point.

    python bench/app_latency.py [--model demo] [--repeats 1]

1. Start-up: starts `python app.py --port <free> --runs-dir <tmp>` and times until `GET /` returns 200.
   Also checks, in a separate process that builds the same app, that torch, transformers, TRL and PEFT
   were not imported (the app must serve without them).
2. Launch to first point: through gradio_client (what a click does), calls `/launch` with a short LoRA
   plan, then `/poll` until the loss chart holds a point; once right after start-up (the app's warm
   worker is still importing, so the trainer starts cold) and once the warm worker is ready. The run's own event times split that wait into
   process start (`started`), imports and model / data loading (`train_begin`), and the first step (`log`).

Prints the figures and writes them to bench/RESULTS.md under "## app_latency".
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench.results import markdown_table, write_section  # noqa: E402

HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate")


def heavy_imports_at_startup() -> list[str]:
    """Heavy modules present after building the whole app (should be none)."""
    code = ("import sys, app; app.build_app(app.AppConfig()); "
            f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    line = next(l for l in done.stdout.splitlines() if l.startswith("heavy:"))
    return [m for m in line[len("heavy:"):].split(",") if m]


def first_point(client, runs: Path, model: str) -> dict:
    """Launch through the API and poll until the loss chart has a point; return the timings in seconds."""
    from trainer.events import EVENTS_FILE, read_all_events

    clicked = time.time()
    client.predict(model=model, dataset="demo-sft", method="lora", max_steps=30, seq_len=64, micro_batch=4,
                   api_name="/launch")
    launched = time.time()
    plotted = None
    while time.time() - clicked < 600:
        loss = client.predict(api_name="/poll")[1]
        if isinstance(loss, dict) and loss.get("plot"):
            traces = json.loads(loss["plot"])["data"]
            if any(t.get("name") == "training loss" and t.get("x") for t in traces):
                plotted = time.time()
                break
        time.sleep(0.2)
    if plotted is None:
        raise RuntimeError("no plotted point within 600 s")
    client.predict(api_name="/stop")
    run_dir = max((p for p in runs.iterdir() if (p / "plan.yaml").is_file()), key=lambda p: p.stat().st_mtime)
    events = read_all_events(run_dir / EVENTS_FILE)
    warm = json.loads((run_dir / "run.json").read_text())["attempts"][-1].get("warm", False)

    def at(kind):
        return next((e["time"] - clicked for e in events if e["event"] == kind), None)

    return {"launch_call": launched - clicked, "started": at("started"), "model_loaded": at("model_loaded"),
            "train_begin": at("train_begin"),
            "first_log": at("log"), "first_point": plotted - clicked, "run_dir": run_dir, "warm": warm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model to launch (default: the bundled demo model)")
    args = parser.parse_args()
    from gradio_client import Client
    from conftest import start_app, stop_app

    heavy = heavy_imports_at_startup()
    work = Path(tempfile.mkdtemp(prefix="tunewise-bench-"))
    runs = work / "runs"
    started = time.time()
    proc, url = start_app(runs, log_path=work / "app.log")
    served = time.time() - started
    print(f"python app.py -> first served page: {served:.1f} s (heavy modules imported at start-up: {heavy or 'none'})")
    try:
        client = Client(url, verbose=False)
        # At once (the app's warm worker is still importing: a cold start), then once it is ready.
        first = first_point(client, runs, args.model)
        from trainer import supervisor, warm

        ready = warm.wait_ready(runs, timeout=300)
        for status in supervisor.list_runs(runs):
            if status.state in ("queued", "running"):
                supervisor.stop(status.run_id, runs_dir=runs, timeout=30)
        second = first_point(client, runs, args.model) if ready else None
    finally:
        from trainer import supervisor

        for status in supervisor.list_runs(runs):
            if status.state in ("queued", "running"):
                supervisor.stop(status.run_id, runs_dir=runs, timeout=30)
        stop_app(proc)
        shutil.rmtree(work, ignore_errors=True)

    def fmt(value):
        return "-" if value is None else f"{value:.1f}"

    def both(key):
        return [fmt(first[key]), fmt(second[key]) if second else "-"]

    rows = [
        ["`python app.py` -> first served page", fmt(served), ""],
        ["launch click -> `/launch` returned (run directory written, process started)", *both("launch_call")],
        ["launch click -> `started` event (training process up, before heavy imports)", *both("started")],
        ["launch click -> `model_loaded` (torch/transformers/TRL imported, model and data loaded)", *both("model_loaded")],
        ["launch click -> `train_begin` (trainer set up, data tokenized)", *both("train_begin")],
        ["launch click -> first `log` event (first optimizer step done)", *both("first_log")],
        ["launch click -> first plotted point (read back by `/poll`)", *both("first_point")],
    ]
    header = ["what", f"first launch, right after start-up ({'warm' if first['warm'] else 'cold start'}): s",
              f"launch once the warm worker is ready ({'warm' if second and second['warm'] else 'cold start'}): s"]
    table = markdown_table(header, rows)
    print(table)
    start_share = ""
    if first["train_begin"] and first["first_point"]:
        start_share = (f"\n\nCold, process start, imports and loading (click -> `train_begin`) are "
                       f"{100 * first['train_begin'] / first['first_point']:.0f}% of the wait for the first point; "
                       "the app's warm worker (trainer/warm.py, started once the page is served) removes the imports.")
    body = (f"Model `{args.model}`, LoRA, micro-batch 4 x 64 tokens, polling every 0.2 s through gradio_client. "
            f"Heavy modules imported by the app at start-up: {', '.join(heavy) or 'none'}.\n\n{table}{start_share}")
    write_section("app_latency", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
