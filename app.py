"""Tunewise in the browser: a five-step wizard from "which model?" to a tuned, exported adapter.

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--demo-mode] [--runs-dir runs]

Layout and event wiring only (see ../shared/style.md): the decisions live in
`advisor` (plans, memory, advice, dataset profiles, `advisor.wizard` for the
widgets-to-plan mapping and table rows), the charts in `figures`, and
training in `trainer` (a separate process per run, driven through
`trainer.supervisor`). The page talks to a run only through its directory:
it launches it, then tails `events.jsonl` from a byte offset kept per browser
session, so closing the browser or restarting this app never stops a run.

Start-up stays fast: torch, transformers and TRL are never imported here;
they load in the training process, or in a subprocess for sample generations.

Demo mode (`--demo-mode`, or automatically on a Hugging Face Space where
SPACE_ID is set) lets visitors train only the bundled demo model, with bounded
steps, one run at a time, and old runs cleaned up; the limits are enforced in
the handlers below, not only in the page. Each visitor sees and drives only
the runs launched from their own browser session and names their uploads by
file name (both kept in gr.State); messages show no server paths. In every
mode the page serves no file of the runs folder (only the export archive it
hands out), and with `--auth` every route but the login page needs the login.

Every event has an `api_name`, so the whole wizard can be driven with
`gradio_client` (tests/test_app_api.py does).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent
LOG = logging.getLogger("tunewise.app")


@dataclass(frozen=True)
class AppConfig:
    """How this server runs."""

    runs_dir: Path = Path("runs")
    """Where run directories live (shared with `tunewise launch/runs/status`)."""
    demo_mode: bool = False
    """Public-demo limits: demo model only, bounded steps, one run at a time, old runs cleaned up."""
    demo_max_steps: int = 40
    """Training steps per run at most in demo mode."""
    demo_keep_runs: int = 8
    """Runs kept on disk in demo mode."""
    poll_seconds: float = 1.0
    """How often the monitor step reads new events."""
    generate_timeout_s: float = 300.0
    """Longest a sample-generation subprocess may take."""
    uploads_dir: Path = field(default=Path("runs") / "_uploads")
    """Where uploaded datasets are kept (under the runs folder, names sanitized)."""
    warm_worker: bool = False
    """Keep a warm trainer (trainer.warm) ready so launches skip the heavy imports (`main` turns it on)."""
    exports_dir: Path | None = None
    """Where export archives are written for download (a folder of their own outside the runs folder, which
    the page never serves; Gradio copies each archive into its cache to serve it). None: a private temp
    folder of this process, made on the first export and removed at a clean exit."""


# -- errors: a message in the page, never a traceback ------------------------------------------------------


def user_message(exc: BaseException) -> str:
    """What the page shows for an exception: TunewiseError messages as they are (they name the field and
    the fix); anything else as a short bug report without the traceback."""
    from advisor.errors import TunewiseError

    if isinstance(exc, TunewiseError):
        return str(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"{exc.filename or 'file'}: {exc.strerror or exc}. Check the path and try again."
    return (f"Something went wrong ({type(exc).__name__}: {exc}). This is a bug in Tunewise, not in your input; "
            "the details are in the server log.")


def friendly(fn: Callable, shown: Callable[[str], str] | None = None) -> Callable:
    """Wrap an event handler so that any exception reaches the page as `gr.Error(message)`; `shown` edits
    each message first (the public demo cuts server paths out)."""
    import gradio as gr

    shown = shown or (lambda text: text)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            exc.message = shown(exc.message)
            raise
        except Exception as exc:  # every handler: the page gets a message, the log gets the traceback
            from advisor.errors import TunewiseError

            if not isinstance(exc, TunewiseError):
                LOG.error("handler %s failed:\n%s", fn.__name__, traceback.format_exc())
            field_name = getattr(exc, "field", None)
            title = f"Check {field_name}" if field_name else ("Check your input" if isinstance(exc, TunewiseError) else "Error")
            raise gr.Error(shown(user_message(exc)), title=title, print_exception=False) from None

    return wrapper


# -- session state --------------------------------------------------------------------------------------


def new_session() -> dict:
    """Per-browser-session state of the plan step (a gr.State): the dataset profile, the last advice, and
    (demo mode) this visitor's uploads by file name."""
    return {"advice": {}, "profile": None, "uploads": {}}


def new_watch() -> dict:
    """Per-browser-session state of the monitor (a gr.State): the run watched, how far its events.jsonl
    was read (byte offset), the events read so far, and the runs this session launched (`own`: in demo
    mode a visitor sees and drives only those)."""
    return {"run_id": None, "offset": 0, "events": [], "own": []}


def _watch(session: dict, run_id: str | None) -> dict:
    """The monitor state, now watching `run_id` from its first event."""
    return {**session, "run_id": run_id, "offset": 0, "events": [], "drawn": False}


# -- the services the handlers call (thin; the logic is in advisor / trainer) ------------------------------


def _supervisor():
    from trainer import supervisor

    return supervisor


def _run_dir(config: AppConfig, run_id: str) -> Path:
    if not run_id or not re.fullmatch(r"[\w.-]+", run_id) or run_id.startswith("."):
        from advisor.errors import TunewiseError

        raise TunewiseError(f"run: {run_id!r} is not a run id; pick a run from the history table", field="run")
    return config.runs_dir / run_id


def sanitize_filename(name: str) -> str:
    """A safe file name for an upload: no directories, no leading dots, only [A-Za-z0-9._-], at most 120
    characters, and the suffix kept (the profile reads a file by its suffix): a long name is cut before
    its suffix, and a data file with no name before its suffix (`....jsonl`) becomes `upload.jsonl`."""
    from advisor.wizard import DATA_SUFFIXES

    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "upload").name)
    stem, dot, tail = base.rpartition(".")
    if dot and re.fullmatch(r"[A-Za-z0-9]{1,16}", tail) and (stem.strip(".") or f".{tail.lower()}" in DATA_SUFFIXES):
        stem, suffix = stem.lstrip(".") or "upload", f".{tail}"
    else:
        stem, suffix = base.lstrip(".") or "upload", ""
    return stem[: 120 - len(suffix)] + suffix


def hide_server_paths(text: str, roots: list[Path]) -> str:
    """`text` with every path under one of `roots` cut to its last part (`/srv/runs/_uploads/x/a.jsonl` ->
    `a.jsonl`): what a public demo's visitors see of the server's folders."""
    for root in roots:
        for form in sorted({str(root).rstrip("/"), str(Path(root).resolve()).rstrip("/")}, key=len, reverse=True):
            if form:
                text = re.sub(re.escape(form) + r"(?![\w-])(?:/[^\s'\"`/]+)*/?",
                              lambda match: match.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    return text


def keep_upload(config: AppConfig, temp_path: str) -> Path:
    """Copy an uploaded file (in gradio's temp folder) under the runs folder, with a sanitized name."""
    from advisor.errors import DatasetError
    from advisor.wizard import DemoLimits

    source = Path(temp_path)
    size = source.stat().st_size
    limit = DemoLimits().max_upload_bytes
    if config.demo_mode and size > limit:
        raise DatasetError(f"dataset: the upload is {size / 1e6:.1f} MB; the public demo takes files up to "
                           f"{limit / 1e6:.0f} MB. Upload a smaller sample.", field="data.dataset")
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.urandom(3).hex()}"
    target_dir = config.uploads_dir / stamp
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / sanitize_filename(source.name)
    shutil.copyfile(source, target)
    return target


def _inside(path: str | None, folder: Path) -> bool:
    """Whether `path` names a file inside `folder`."""
    if not path:
        return False
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve()) and Path(path).is_file()
    except (OSError, ValueError):
        return False


def cleanup_old_runs(config: AppConfig, keep: int) -> list[str]:
    """Demo mode: delete the oldest finished runs beyond `keep`. Returns the ids removed."""
    supervisor = _supervisor()
    runs = supervisor.list_runs(config.runs_dir)
    finished = [r for r in runs if getattr(r, "state", None) in ("finished", "failed", "stopped")]
    finished.sort(key=lambda r: r.created_at or 0)
    removed = []
    for status in finished[: max(0, len(finished) - keep)]:
        run_dir = _run_dir(config, status.run_id)
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(status.run_id)
    # Uploaded datasets too: keep the newest few upload folders (each upload has its own).
    if config.uploads_dir.is_dir():
        folders = sorted((p for p in config.uploads_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for folder in folders[: max(0, len(folders) - 4 * keep)]:
            shutil.rmtree(folder, ignore_errors=True)
    return removed


def sorted_runs(config: AppConfig) -> list:
    """Every run's status, newest first."""
    return list(_supervisor().list_runs(config.runs_dir))


def run_history(config: AppConfig, only: list[str] | None = None) -> tuple[list[list[Any]], list[str]]:
    """Rows of the run-history table (newest first) and the run ids; with `only`, just those runs."""
    from advisor import wizard
    from advisor.plan import Plan
    from trainer.events import EVENTS_FILE, read_events

    rows, ids = [], []
    for status in sorted_runs(config):
        if only is not None and status.run_id not in only:
            continue
        run_dir = config.runs_dir / status.run_id
        events, _ = read_events(run_dir / EVENTS_FILE, 0)
        summary = wizard.run_summary(events)
        try:
            summary["what"] = wizard.run_what(Plan.load(run_dir / "plan.yaml"))
        except Exception:  # a damaged plan file still lists the run
            summary["what"] = "(plan unreadable)"
        started = status.created_at or (events[0].get("time") if events else None)
        summary["started"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if started else ""
        rows.append(wizard.run_row(status.run_id, status, summary))
        ids.append(status.run_id)
    return rows, ids


def active_runs(config: AppConfig) -> list:
    """Runs that are queued or running."""
    return [r for r in _supervisor().list_runs(config.runs_dir) if getattr(r, "state", None) in ("queued", "running")]


# -- page fragments ---------------------------------------------------------------------------------------


def progress_html(run_id: str | None, progress, status=None) -> str:
    """The monitor's header: run id, state badge, a progress bar, step / total and time left."""
    from figures import format_duration

    if not run_id:
        return ("<div class='tw-run tw-idle'><b>No run yet.</b> Launch the plan from step 3, or open a run "
                "from the history in step 5.</div>")
    state = getattr(status, "state", None) or progress.state
    if state == "training":
        state = "running"
    total = progress.max_steps
    pct = int(round(progress.fraction * 100))
    steps = f"step {progress.step} / {total}" if total else f"step {progress.step}"
    eta = f" &middot; about {format_duration(progress.eta_s)} left" if progress.eta_s is not None and state == "running" else ""
    loss = f" &middot; loss {progress.last_loss:.4f}" if progress.last_loss is not None else ""
    stage = f" &middot; stage {progress.stage}" if progress.stage else ""
    reason = ""
    if state in ("failed", "stopped") and (progress.reason or getattr(status, "error", None)):
        reason = f"<div class='tw-reason'>{_escape(progress.reason or getattr(status, 'error', ''))}</div>"
    return (
        f"<div class='tw-run tw-{state}'>"
        f"<div class='tw-run-head'><span class='tw-badge tw-badge-{state}'>{state}</span> "
        f"<code>{_escape(run_id)}</code> &middot; {steps}{eta}{loss}{stage} "
        f"&middot; elapsed {format_duration(progress.elapsed_s)}</div>"
        f"<div class='tw-bar'><div class='tw-bar-fill' style='width:{pct}%'></div></div>{reason}</div>"
    )


def _escape(text: Any) -> str:
    import html

    return html.escape(str(text))


def alerts_markdown(messages: list[str]) -> str:
    if not messages:
        return "No alerts so far. The monitors watch forgetting, KL explosion, reward hacking and mode collapse."
    return "\n".join(f"- **{_escape(m)}**" for m in messages[-20:])


def model_card_markdown(spec, counts) -> str:
    from advisor.wizard import human_count

    kind = f"{spec.model_type}" + (f", mixture of {spec.num_experts} experts ({spec.experts_per_token} per token)" if spec.num_experts else "")
    rough = "\n\n*Rough mode: a Llama-shaped model of this size (the guide's rule of thumb).*" if spec.rough else ""
    return (
        f"### {spec.id}\n"
        f"**{human_count(counts.total)} parameters** ({counts.total:,}) &middot; architecture **{kind}**\n\n"
        f"| layers | hidden | heads (KV) | MLP | vocab | max context |\n|---|---|---|---|---|---|\n"
        f"| {spec.num_layers} | {spec.hidden_size} | {spec.num_heads} ({spec.num_kv_heads}) | {spec.intermediate_size} "
        f"| {spec.vocab_size:,} | {spec.max_position_embeddings:,} |\n\n"
        f"Embeddings {human_count(counts.embeddings)} &middot; attention {human_count(counts.attention)} &middot; "
        f"MLP {human_count(counts.mlp)} &middot; norms {human_count(counts.norms)} &middot; lm_head {human_count(counts.lm_head)}"
        f" &middot; source: {spec.source}{rough}"
    )


CSS_PATH = REPO_ROOT / "assets" / "ui.css"


# -- the app ----------------------------------------------------------------------------------------------


def _number_component(gr):
    """A gr.Number factory whose refusals name the field: a value out of range gets the range that fits
    (Gradio's own says only "Value 0 is less than minimum value 1."), and text, a list, NaN or infinity
    get "must be a number" (Gradio's own error there is not shown at all). It wraps each instance's
    `preprocess` rather than subclassing: a Component subclass makes Gradio write a .pyi file beside
    this module."""
    from advisor.wizard import NUMBER_LIMITS, number_problem

    def Number(name: str, **kwargs):  # noqa: N802 (used like the class it stands for)
        """The number box for plan widget `name`, bounded by wizard.NUMBER_LIMITS."""
        low, high = NUMBER_LIMITS[name]
        component = gr.Number(minimum=low, maximum=high, **kwargs)
        check = component.preprocess

        def preprocess(payload):
            problem = number_problem(payload, component.minimum, component.maximum)
            if problem:
                raise gr.Error(f"{component.label}: {problem}.", title="Check this value")
            return check(payload)

        component.preprocess = preprocess
        return component

    return Number


class RequireLogin:
    """ASGI middleware: with a login (`--auth`), only the login page and what it loads answer without the
    login cookie. Gradio checks the login on most of its routes but not on all of them (POST
    /gradio_api/cancel and /gradio_api/reset answer anyone), so this checks it once, in front of every
    route, the way Gradio does (its `access-token` cookie, looked up in the app's tokens)."""

    #: What the login page needs before anyone has logged in (Gradio's own routes check /config).
    PUBLIC = frozenset({"/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico", "/theme.css",
                        "/robots.txt", "/manifest.json", "/pwa_icon", "/gradio_api/startup-events"})
    PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon/")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not self._allowed(scope):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            from starlette.responses import JSONResponse

            await JSONResponse({"detail": "Not authenticated"}, status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        server = scope.get("app")
        if getattr(server, "auth", None) is None and getattr(server, "auth_dependency", None) is None:
            return True  # no login asked for
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path in self.PUBLIC or path.startswith(self.PUBLIC_PREFIXES):
            return True
        if getattr(server, "auth_dependency", None) is not None:
            return True  # an external login (not used by this app) is Gradio's to check
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope).cookies
        cookie_id = getattr(server, "cookie_id", "")
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return token is not None and token in getattr(server, "tokens", {})


def build_app(config: AppConfig):
    """The Blocks app: layout first, then the event wiring (every event with an api_name)."""
    import gradio as gr

    Number = _number_component(gr)  # noqa: N806 (stands for gr.Number)

    import figures
    from advisor import wizard
    from advisor.errors import TunewiseError
    from trainer.events import EVENTS_FILE, read_events

    demo_limits = wizard.DemoLimits(max_steps=config.demo_max_steps, keep_runs=config.demo_keep_runs)
    # The demo's one-run-at-a-time check and the launch must not interleave between requests (the queue
    # runs handlers concurrently): both happen under this lock.
    launch_lock = threading.Lock()

    with gr.Blocks(title="Tunewise: plan, advise and run fine-tuning") as app:
        session = gr.State(new_session)  # this browser's plan step: dataset profile, last advice
        watch = gr.State(new_watch)  # this browser's monitor: the run watched, event offset, events read

        gr.HTML(
            "<div class='tw-header'><div class='tw-logo'>Tunewise</div>"
            "<div class='tw-tagline'>Plan the memory, get the settings with their reasons, train in the background "
            "and watch loss, reward vs KL and forgetting live.</div></div>"
        )
        if config.demo_mode:
            gr.HTML(
                f"<div class='tw-demo'>Public demo: training is limited to the bundled demo model, "
                f"{config.demo_max_steps} steps, one run at a time. Planning works for any model.</div>"
            )

        with gr.Walkthrough(selected=1, elem_id="wizard") as walkthrough:
            # ---------------------------------------------------------------- step 1
            with gr.Step("Model & hardware", id=1, elem_id="step-model"):
                with gr.Row():
                    with gr.Column(scale=3):
                        model = gr.Dropdown(
                            choices=wizard.model_choices(), value="demo", label="Model", allow_custom_value=True,
                            filterable=True, elem_id="model",
                            info="Search the catalogue, or type a hub id (owner/name), a local folder, or a size like 7B.",
                        )
                        with gr.Row():
                            gpu = gr.Dropdown(choices=wizard.gpu_choices(), value=wizard.NO_GPU, label="GPU", elem_id="gpu",
                                              info="What you will train on; the plan is sized for it.")
                            num_gpus = Number("num_gpus", value=1, precision=0, label="Number of GPUs",
                                                 elem_id="num_gpus")
                    with gr.Column(scale=4):
                        model_card = gr.Markdown(elem_id="model-card")
                with gr.Row():
                    next_1 = gr.Button("Next: data & goal", variant="primary", elem_id="next-1", scale=0, min_width=200)
                    history_1 = gr.Button("Run history", elem_id="open-history", scale=0, min_width=140)

            # ---------------------------------------------------------------- step 2
            with gr.Step("Data & goal", id=2, elem_id="step-data"):
                with gr.Row():
                    with gr.Column(scale=3):
                        dataset = gr.Dropdown(
                            choices=wizard.dataset_choices(), value="demo-sft", allow_custom_value=True,
                            label="Dataset", elem_id="dataset",
                            info="A bundled demo set, a local JSONL / JSON / CSV / Parquet path, or upload a file below.",
                        )
                        upload = gr.File(label="Upload a dataset", file_types=[".jsonl", ".json", ".csv", ".parquet", ".txt"],
                                         file_count="single", height=90, elem_id="upload")
                        goal = gr.Dropdown(choices=list(wizard.GOAL_CHOICES), value="sft", label="Stage or pipeline",
                                           elem_id="goal")
                        task = gr.Radio(choices=list(wizard.TASK_CHOICES), value="instruction", label="Task complexity",
                                        elem_id="task")
                        domain = gr.Radio(choices=list(wizard.DOMAIN_CHOICES), value="medium",
                                          label="How far is the task from pretraining?", elem_id="domain")
                        priority = gr.Radio(choices=list(wizard.PRIORITY_CHOICES), value="balanced",
                                            label="Quality or memory?", elem_id="priority")
                        quantized_inference = gr.Checkbox(value=False, label="The tuned model will be served quantized",
                                                          elem_id="quantized-inference")
                    with gr.Column(scale=4):
                        profile_table = gr.Dataframe(headers=["profile", ""], value=[], interactive=False, wrap=True,
                                                     label="Dataset profile", elem_id="profile-table")
                        histogram = gr.Plot(label="Token lengths", elem_id="histogram")
                with gr.Row():
                    back_2 = gr.Button("Back", elem_id="back-2", scale=0, min_width=100)
                    next_2 = gr.Button("Next: plan and advice", variant="primary", elem_id="next-2", scale=0, min_width=220)

            # ---------------------------------------------------------------- step 3
            with gr.Step("Plan", id=3, elem_id="step-plan"):
                plan_status = gr.Markdown(elem_id="plan-status")
                with gr.Row():
                    with gr.Column(scale=5):
                        memory_plot = gr.Plot(label="Memory per GPU", show_label=False, elem_id="memory-plot")
                    with gr.Column(scale=6):
                        memory_table = gr.Dataframe(interactive=False, label="Memory per GPU: Full / LoRA / QLoRA",
                                                    elem_id="memory-table", wrap=True)
                        fit_table = gr.Dataframe(interactive=False, label="GPU fit for the plan's method", wrap=True,
                                                 elem_id="fit-table")
                advice_notes = gr.Markdown(elem_id="advice-notes")
                recommendations = gr.Dataframe(headers=["setting", "value", "why"], interactive=False, wrap=True,
                                               label="Recommendations, each with its reason", elem_id="recommendations",
                                               column_widths=["18%", "14%", "68%"])
                with gr.Accordion("Edit the plan: every value updates memory and fit at once", open=True,
                                  elem_id="plan-editor"):
                    with gr.Row():
                        method = gr.Radio(choices=[("Full fine-tuning", "full"), ("LoRA", "lora"), ("QLoRA", "qlora")],
                                          value="lora", label="Method", elem_id="method")
                        precision = gr.Dropdown(choices=["bf16", "fp16", "fp32", "amp"], value="bf16", label="Precision")
                        optimizer = gr.Dropdown(choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"],
                                                value="adamw", label="Optimizer")
                        shard = gr.Dropdown(choices=[("none (DDP)", "none"), ("ZeRO-2", "zero2"), ("ZeRO-3 / FSDP", "zero3")],
                                            value="none", label="Sharding")
                    with gr.Row():
                        lora_rank = Number("lora_rank", value=16, precision=0, label="LoRA rank", elem_id="lora-rank")
                        lora_alpha = Number("lora_alpha", value=32, label="LoRA alpha")
                        lora_dropout = Number("lora_dropout", value=0.05, step=0.01, label="LoRA dropout")
                        lora_targets = gr.Dropdown(choices=["q_proj", "k_proj", "v_proj", "o_proj"], multiselect=True,
                                                   allow_custom_value=True, value=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                   label="Target modules", scale=2)
                        double_quant = gr.Checkbox(value=True, label="Double quantization (QLoRA)")
                    with gr.Row():
                        learning_rate = Number("learning_rate", value=2e-4, label="Learning rate", step=1e-5, elem_id="learning-rate")
                        warmup_ratio = Number("warmup_ratio", value=0.05, step=0.01, label="Warmup share")
                        lr_scheduler = gr.Dropdown(choices=["cosine", "linear", "constant", "constant_with_warmup"],
                                                   value="cosine", label="LR schedule")
                        epochs = Number("epochs", value=1, label="Epochs")
                        max_steps = Number("max_steps", value=30, precision=0, label="Max steps (0: run the epochs)",
                                              elem_id="max-steps")
                    with gr.Row():
                        micro_batch = Number("micro_batch", value=4, precision=0, label="Micro-batch", elem_id="micro-batch")
                        grad_accum = Number("grad_accum", value=1, precision=0, label="Gradient accumulation")
                        seq_len = Number("seq_len", value=512, precision=0, label="Sequence length", elem_id="seq-len")
                        gradient_checkpointing = gr.Checkbox(value=False, label="Gradient checkpointing")
                        packing = gr.Checkbox(value=False, label="Packing")
                        attn = gr.Dropdown(choices=["sdpa", "eager"], value="sdpa", label="Attention")
                    with gr.Row():
                        replay_fraction = Number("replay_fraction", value=0.0, step=0.01, label="Replay share (forgetting)")
                        ewc_lambda = Number("ewc_lambda", value=0.0, label="EWC strength")
                        forgetting_eval_every = Number("forgetting_eval_every", value=10, precision=0,
                                                          label="Forgetting check every (steps)")
                        forgetting_threshold = Number("forgetting_threshold", value=20.0, label="Forgetting alert at +% loss")
                        stop_on_threshold = gr.Checkbox(value=False, label="Stop when forgetting crosses it")
                        beta = Number("beta", value=0.1, step=0.05, label="DPO beta")
                        kl_coef = Number("kl_coef", value=0.05, step=0.01, label="PPO KL coefficient")
                    readvise = gr.Button("Re-advise, keeping my changes", size="sm", elem_id="readvise")
                with gr.Row():
                    with gr.Column(scale=3):
                        guide_table = gr.Dataframe(interactive=False, wrap=True, elem_id="guide-table",
                                                   label="The guide's quick reference beside our estimate (GB)")
                    with gr.Column(scale=2):
                        guide_note = gr.Markdown(elem_id="guide-note")
                with gr.Accordion("How each memory figure is computed", open=False):
                    explanations = gr.Dataframe(headers=["component", "how"], interactive=False, wrap=True,
                                                column_widths=["20%", "80%"])
                with gr.Accordion("Show as YAML / CLI", open=False, elem_id="show-yaml"):
                    cli_text = gr.Code(language="shell", label="Run it from a terminal", elem_id="cli-text")
                    yaml_text = gr.Code(language="yaml", label="plan.yaml", elem_id="yaml-text")
                with gr.Row():
                    back_3 = gr.Button("Back", elem_id="back-3", scale=0, min_width=100)
                    launch_btn = gr.Button("Launch training", variant="primary", elem_id="launch", scale=0, min_width=200)

            # ---------------------------------------------------------------- step 4
            with gr.Step("Launch & monitor", id=4, elem_id="step-monitor"):
                run_header = gr.HTML(progress_html(None, None), elem_id="run-header")
                with gr.Row():
                    stop_btn = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="stop", scale=0, min_width=220)
                    resume_btn = gr.Button("Resume from the last checkpoint", elem_id="resume", scale=0, min_width=260)
                    log_btn = gr.Button("Show the log tail", elem_id="show-log", scale=0, min_width=170)
                    to_results = gr.Button("Results & runs", elem_id="next-4", scale=0, min_width=150)
                with gr.Row():
                    loss_plot = gr.Plot(figures.loss_figure([]), label="Loss", show_label=False, elem_id="loss-plot")
                    forgetting_plot = gr.Plot(figures.forgetting_figure([]), label="Forgetting", show_label=False,
                                              elem_id="forgetting-plot")
                # Shown once the run logs a reward or a KL (preference stages).
                with gr.Row(visible=False, elem_id="reward-row") as reward_row:
                    reward_time_plot = gr.Plot(figures.reward_kl_time_figure([]), label="Reward and KL", show_label=False,
                                               elem_id="reward-time-plot")
                    reward_kl_plot = gr.Plot(figures.reward_vs_kl_figure([]), label="Reward against KL", show_label=False,
                                             elem_id="reward-kl-plot")
                alerts = gr.Markdown(alerts_markdown([]), label="Alerts", elem_id="alerts")
                log_tail = gr.Code(language=None, label="stdout.log (last lines)", visible=False, elem_id="log-tail")
                timer = gr.Timer(config.poll_seconds, active=False)

            # ---------------------------------------------------------------- step 5
            with gr.Step("Results & runs", id=5, elem_id="step-results"):
                with gr.Row():
                    refresh_btn = gr.Button("Refresh the history", scale=0, min_width=180, elem_id="refresh-runs")
                runs_table = gr.Dataframe(headers=wizard.RUN_HEADERS, interactive=False, wrap=True, label="Run history",
                                          elem_id="runs-table")
                with gr.Row():
                    open_run = gr.Dropdown(choices=[], label="Run", elem_id="open-run", scale=2)
                    watch_btn = gr.Button("Watch in step 4", scale=0, min_width=170, elem_id="watch")
                with gr.Row():
                    compare_runs = gr.Dropdown(choices=[], multiselect=True, label="Overlay the curves of", scale=3,
                                               elem_id="compare-runs")
                    compare_metric = gr.Dropdown(choices=["loss", "eval_loss", "learning_rate", "grad_norm",
                                                          "rewards/margins", "objective/kl", "reward", "kl_sequence"],
                                                 value="loss", allow_custom_value=True, label="Metric", scale=1)
                overlay_plot = gr.Plot(label="Runs compared", elem_id="overlay-plot")
                with gr.Accordion("Base vs tuned: sample generations side by side", open=False, elem_id="samples"):
                    prompts = gr.Textbox(lines=3, label="Prompts (one per line)",
                                         value="Convert 2011-09-24 to day, month and year.\nPlease spell out the date 2016-05-11.")
                    generate_btn = gr.Button("Generate with the base and the tuned model", elem_id="generate")
                    samples_table = gr.Dataframe(headers=["prompt", "base", "tuned"], interactive=False, wrap=True)
                with gr.Accordion("Merge / export", open=False, elem_id="export"):
                    export_reload = gr.Checkbox(value=False, label="QLoRA run: merge into the base reloaded in 16 bit "
                                                "(the adapter was trained against 4-bit weights)")
                    export_btn = gr.Button("Merge the adapter into the base and export", elem_id="export-btn")
                    export_note = gr.Markdown()
                    export_file = gr.File(label="Download", interactive=False)

        plan_widgets = {
            "model": model, "dataset": dataset, "goal": goal, "gpu": gpu, "num_gpus": num_gpus,
            "method": method, "precision": precision, "optimizer": optimizer, "lora_rank": lora_rank,
            "lora_alpha": lora_alpha, "lora_targets": lora_targets, "lora_dropout": lora_dropout,
            "double_quant": double_quant, "gradient_checkpointing": gradient_checkpointing, "attn": attn,
            "shard": shard, "learning_rate": learning_rate, "warmup_ratio": warmup_ratio,
            "lr_scheduler": lr_scheduler, "epochs": epochs, "max_steps": max_steps, "micro_batch": micro_batch,
            "grad_accum": grad_accum, "seq_len": seq_len, "packing": packing, "replay_fraction": replay_fraction,
            "ewc_lambda": ewc_lambda, "forgetting_eval_every": forgetting_eval_every,
            "forgetting_threshold": forgetting_threshold,
            "stop_on_threshold": stop_on_threshold, "beta": beta, "kl_coef": kl_coef,
        }
        assert set(plan_widgets) == set(wizard.PLAN_WIDGETS), "every plan widget is wired"
        advice_widgets = {name: plan_widgets[name] for name in wizard.ADVISED_WIDGETS}
        advisor_widgets = {"model": model, "dataset": dataset, "goal": goal, "gpu": gpu, "num_gpus": num_gpus,
                           "task": task, "domain": domain, "priority": priority,
                           "quantized_inference": quantized_inference}

        # ================================================================ handlers

        # In demo mode a visitor's uploads are named in the page by their file name only: `session["uploads"]`
        # maps each name to the kept file, for this browser session alone, so no server path reaches the page
        # and no visitor can name another's upload.
        def dataset_path(session, dataset):
            """The file behind a dataset name this visitor uploaded (demo mode), else `dataset` itself."""
            if config.demo_mode and isinstance(dataset, str):
                return (session.get("uploads") or {}).get(dataset.strip(), dataset)
            return dataset

        def demo_guard(model=None, dataset=None, session=None):
            if config.demo_mode:
                uploads = ((session or {}).get("uploads") or {}).values()
                wizard.check_demo_inputs(model, dataset_path(session or {}, dataset), uploads)

        # The runs a visitor may see and drive in demo mode: those launched from this browser session
        # (`watch["own"]`); outside demo mode every run in the runs folder.
        def check_own(watch, run_id):
            if config.demo_mode and run_id not in (watch.get("own") or []):
                raise TunewiseError(f"run: {run_id!r} is not one of your runs; the public demo shows each visitor "
                                    "only the runs they launched from this page", field="run")

        def own_runs(watch):
            return list(watch.get("own") or []) if config.demo_mode else None

        def shown(text):
            """What a visitor may see of a message, log or note: demo mode cuts server paths to file names."""
            if not config.demo_mode or not isinstance(text, str):
                return text
            from gradio.utils import get_upload_folder

            return hide_server_paths(text, [config.runs_dir, config.uploads_dir, REPO_ROOT,
                                            Path(get_upload_folder()), Path(tempfile.gettempdir())])

        def handler(fn):
            """friendly(fn), its messages passed through shown()."""
            return friendly(fn, shown)

        @handler
        def on_model(model):
            demo_guard(model=model)
            spec, counts = wizard.model_summary(model)
            return model_card_markdown(spec, counts)

        uploaded_here = app.upload_file_set  # every file Gradio's upload route received (its own record)

        @handler
        def on_upload(session, upload):
            if not upload:
                return gr.skip(), session
            if str(Path(upload).resolve()) not in {str(Path(p).resolve()) for p in uploaded_here}:
                # Gradio fetches a URL named in the request itself; only files sent to its upload route count.
                raise TunewiseError("dataset: only a file sent through the upload box can be used here, not a "
                                    "file named by its address", field="data.dataset")
            kept = keep_upload(config, upload)
            if not config.demo_mode:
                return gr.update(value=str(kept), choices=wizard.dataset_choices() + [(kept.name, str(kept))]), session
            uploads = {**(session.get("uploads") or {}), kept.name: str(kept)}
            session = {**session, "uploads": uploads}
            return gr.update(value=kept.name, choices=wizard.dataset_choices() + [(name, name) for name in uploads]), session

        @handler
        def on_profile(session, dataset, model):
            if not isinstance(dataset, str) or not dataset.strip():
                wizard.text_value(dataset, "data.dataset", wizard.TEXT_WIDGETS["dataset"])  # not text: says so
                raise TunewiseError("data.dataset: no dataset chosen; pick a bundled one or upload a file"
                                    + ("" if config.demo_mode else ", or type a file path"), field="data.dataset")
            model = wizard.text_value(model, "model.name", wizard.TEXT_WIDGETS["model"])
            demo_guard(model=model, dataset=dataset, session=session)
            from advisor.profile import profile_dataset

            profile = profile_dataset(dataset_path(session, dataset), model or None)
            session = {**session, "profile": profile.to_dict()}
            fig = figures.token_histogram_figure(profile.histogram.edges, profile.histogram.counts,
                                                 profile.recommended_seq_len, profile.tokens.p95)
            return session, wizard.profile_rows(profile), fig

        def _plan_outputs(plan, session):
            view = wizard.plan_view(plan)
            rows = wizard.recommendation_rows(session.get("advice") or {}, wizard.widgets_from_plan(plan))
            headers, mem_rows = view.memory
            fit_headers, fits = view.fit
            status = view.status_markdown
            return (
                {"headers": headers, "data": mem_rows},
                figures.memory_figure(view.stacked, view.gpu_bytes, view.gpu_label),
                {"headers": fit_headers, "data": fits},
                rows,
                status,
                view.explanations,
                wizard.train_command(plan),
                wizard.plan_yaml(plan),
            )

        @handler
        def on_recommend(session, keep_changes=False, **values):
            demo_guard(values.get("model"), values.get("dataset"), session)
            advisor_values = {name: values[name] for name in advisor_widgets}
            overrides = {name: values[name] for name in wizard.ADVISED_WIDGETS} if keep_changes else None
            steps = values.get("max_steps")
            steps = int(steps) if isinstance(steps, (int, float)) and steps >= 1 else None
            advised = wizard.advise(advisor_values, session.get("profile"), overrides, max_steps=steps)
            session = {**session, "advice": advised.values}
            widget_values = wizard.widgets_from_plan(advised.plan)
            updates = [gr.update(value=widget_values[name], choices=advised.target_choices) if name == "lora_targets"
                       else widget_values[name] for name in advice_widgets]
            guide_headers, guide_rows = wizard.guide_rows()
            return [session, *updates, {"headers": guide_headers, "data": guide_rows}, wizard.guide_note(),
                    advised.notes_markdown]

        def recommend_fresh(session, **values):
            return on_recommend(session, False, **values)

        def recommend_keep(session, **values):
            return on_recommend(session, True, **values)

        @handler
        def on_estimate(session, **values):
            demo_guard(values.get("model"), values.get("dataset"), session)
            plan = wizard.plan_from_widgets(values)  # an upload keeps its name here: the page shows the plan
            return _plan_outputs(plan, session)

        def _poll(session):
            """Read the new bytes of the watched run's events.jsonl and redraw (only when something arrived).
            The last output switches the timer off once the run has ended and everything was read."""
            run_id = session.get("run_id")
            if not run_id:
                return [session] + [gr.skip()] * 6 + [gr.Timer(active=False), gr.skip()]
            events, offset = read_events(config.runs_dir / run_id / EVENTS_FILE, session.get("offset", 0))
            try:
                status = _supervisor().status(run_id, config.runs_dir)
            except TunewiseError:  # the run directory was deleted: show what was read
                status = None
            all_events = session.get("events", []) + events
            session = {**session, "offset": offset, "events": all_events}
            progress = figures.run_progress(all_events)
            header = shown(progress_html(run_id, progress, status))
            still_going = status is not None and status.state in ("queued", "running")
            timer_update = gr.Timer(active=still_going or bool(events))
            if not events and session.get("drawn"):
                return [session, header] + [gr.skip()] * 5 + [timer_update, gr.skip()]
            session["drawn"] = True
            series = figures.reward_kl_series(all_events)
            has_preference = bool(series["reward"][0] or series["kl"][0])
            return [
                session, header,
                figures.loss_figure(all_events),
                figures.forgetting_figure(all_events),
                figures.reward_kl_time_figure(all_events),
                figures.reward_vs_kl_figure(all_events),
                alerts_markdown(figures.alert_messages(all_events)),
                timer_update,
                gr.Row(visible=has_preference),
            ]

        on_poll = handler(_poll)

        @handler
        def on_launch(session, plan_session, **values):
            demo_guard(values.get("model"), values.get("dataset"), plan_session)
            plan = wizard.plan_from_widgets({**values, "dataset": dataset_path(plan_session, values.get("dataset"))})
            notes = []
            supervisor = _supervisor()
            if config.demo_mode:
                plan, notes = wizard.apply_demo_limits(plan, demo_limits)
            with launch_lock:
                busy = active_runs(config) if config.demo_mode else []
                if busy:
                    current = busy[0]
                    if current.run_id in (session.get("own") or []):
                        what = (f"your run {current.run_id} is {current.state} (step {current.step}/"
                                f"{current.max_steps or '?'}). Watch it in step 4 and launch again when it finishes")
                    else:  # another visitor's: say nothing about it but that it exists
                        what = (f"another visitor's run is training (at most {demo_limits.max_steps} steps). "
                                "Launch again in a few minutes")
                    raise TunewiseError(f"queue: the public demo trains one run at a time and {what}; the button "
                                        "will work then.", field="queue")
                if config.demo_mode:
                    cleanup_old_runs(config, demo_limits.keep_runs - 1)
                # An upload goes into the run's own folder: the run keeps its data when old uploads are cleaned.
                uploaded = _inside(plan.data.dataset, config.uploads_dir)
                run_id = supervisor.launch(plan, config.runs_dir, copy_dataset=uploaded)
            if config.warm_worker:  # the worker may have gone (idle, or orphaned by a restart): ready one for next time
                threading.Thread(target=_ensure_warm, args=(config.runs_dir,), daemon=True).start()
            if notes:
                gr.Info("Demo limits applied: " + "; ".join(notes))
            session = {**_watch(session, run_id), "own": [*(session.get("own") or []), run_id]}
            return [gr.Walkthrough(selected=4)] + _poll(session)

        @handler
        def on_stop(session):
            run_id = session.get("run_id")
            if not run_id:
                raise TunewiseError("run: nothing to stop; launch a run or open one from the history first", field="run")
            check_own(session, run_id)
            # stop() waits for the run to save and exit (killing it after 30 s): do that in the
            # background so the page stays live; the monitor shows "stopped" when it is done.
            threading.Thread(target=_supervisor().stop, args=(run_id,),
                             kwargs={"runs_dir": config.runs_dir, "timeout": 30}, daemon=True).start()
            gr.Info(f"Stop requested: {run_id} saves a checkpoint and ends after the current step.")
            return _poll(session)

        @handler
        def on_resume(session):
            run_id = session.get("run_id")
            if not run_id:
                raise TunewiseError("run: nothing to resume; open a stopped run from the history first", field="run")
            check_own(session, run_id)
            with launch_lock:
                if config.demo_mode and active_runs(config):
                    raise TunewiseError("queue: the public demo trains one run at a time; wait for the current run to end",
                                        field="queue")
                new_id = _supervisor().resume(run_id, config.runs_dir)
            if new_id != run_id:
                session = {**_watch(session, new_id), "own": [*(session.get("own") or []), new_id]}
            gr.Info(f"Resuming {new_id} from its last checkpoint.")
            return _poll(session)

        @handler
        def on_log_tail(session):
            run_id = session.get("run_id")
            if not run_id:
                return gr.update(visible=True, value="(no run selected)")
            check_own(session, run_id)
            path = _run_dir(config, run_id) / "stdout.log"
            return gr.update(visible=True, value=shown(tail_text(path, 60)))

        @handler
        def on_runs(watch):
            rows, ids = run_history(config, only=own_runs(watch))
            # The newest run is picked and its curve drawn, so the step never opens on an empty chart.
            return rows, gr.update(choices=ids, value=ids[0] if ids else None), gr.update(choices=ids, value=ids[:1])

        @handler
        def on_watch(session, run_id):
            if not run_id:
                raise TunewiseError("run: pick a run in the list first", field="run")
            _run_dir(config, run_id)
            check_own(session, run_id)
            session = _watch(session, run_id)
            return [gr.Walkthrough(selected=4)] + _poll(session)

        @handler
        def on_attach(session):
            """On page load: watch the newest running run, so reopening the browser shows it again."""
            if session.get("run_id"):
                return [gr.skip()] + _poll(session)
            try:
                runs = sorted_runs(config)
            except Exception:
                runs = []
            mine = own_runs(session)  # demo mode: only a run this visitor launched, never another's
            running = [r for r in runs if getattr(r, "state", None) in ("running", "queued")
                       and (mine is None or r.run_id in mine)]
            if running:
                session = _watch(session, running[0].run_id)
                return [gr.Walkthrough(selected=4)] + _poll(session)
            return [gr.skip()] + _poll(session)

        @handler
        def on_overlay(run_ids, metric, watch):
            if not isinstance(metric, str) or not metric.strip():
                raise TunewiseError(f"metric: pick a metric to compare (loss, eval_loss, reward, ...), not {metric!r}",
                                    field="metric")
            if run_ids is not None and not isinstance(run_ids, list):
                raise TunewiseError("run: pick the runs to compare from the list", field="run")
            runs = {}
            for run_id in run_ids or []:
                check_own(watch, run_id)
                events, _ = read_events(_run_dir(config, run_id) / EVENTS_FILE, 0)
                runs[run_id] = events
            kind = "eval" if metric.startswith("eval") else ("sample" if metric in ("reward", "kl_sequence", "kl") else "log")
            return figures.overlay_figure(runs, metric=metric, kind=kind)

        @handler
        def on_generate(run_id, prompts, watch):
            if not run_id:
                raise TunewiseError("run: pick a finished run in the list first", field="run")
            check_own(watch, run_id)
            lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
            if not lines:
                raise TunewiseError("prompts: write at least one prompt, one per line", field="prompts")
            if len(lines) > 8:
                raise TunewiseError("prompts: at most 8 prompts at a time", field="prompts")
            rows = generate_samples(config, _run_dir(config, run_id), lines)
            return rows

        @handler
        def on_export(run_id, reload_16bit, watch):
            if not run_id:
                raise TunewiseError("run: pick a finished run in the list first", field="run")
            check_own(watch, run_id)
            archive, note = export_run(config, _run_dir(config, run_id), bool(reload_16bit))
            return shown(note), archive

        # ================================================================ wiring

        nav = dict(show_progress="hidden")
        next_1.click(lambda: gr.Walkthrough(selected=2), outputs=walkthrough, api_name="go_data", **nav)
        back_2.click(lambda: gr.Walkthrough(selected=1), outputs=walkthrough, api_name="go_model", **nav)
        back_3.click(lambda: gr.Walkthrough(selected=2), outputs=walkthrough, api_name="back_to_data", **nav)
        history_1.click(lambda: gr.Walkthrough(selected=5), outputs=walkthrough, api_name="go_history", **nav).then(
            on_runs, inputs=watch, outputs=[runs_table, open_run, compare_runs], api_name="runs_after_history")
        to_results.click(lambda: gr.Walkthrough(selected=5), outputs=walkthrough, api_name="go_results", **nav).then(
            on_runs, inputs=watch, outputs=[runs_table, open_run, compare_runs], api_name="runs_after_nav")

        plan_outputs = [memory_table, memory_plot, fit_table, recommendations, plan_status, explanations, cli_text,
                        yaml_text]
        recommend_outputs = [session, *advice_widgets.values(), guide_table, guide_note, advice_notes]

        model.change(on_model, inputs=model, outputs=model_card, api_name="model_info")
        upload.upload(on_upload, inputs=[session, upload], outputs=[dataset, session], api_name="upload")
        dataset.change(on_profile, inputs=[session, dataset, model], outputs=[session, profile_table, histogram],
                       api_name="profile")

        all_inputs = {**plan_widgets, **advisor_widgets}
        next_2.click(lambda: gr.Walkthrough(selected=3), outputs=walkthrough, api_name="go_plan", **nav).then(
            recommend_fresh, inputs=[session], inputs_kwargs=all_inputs, outputs=recommend_outputs,
            api_name="recommend").then(
            on_estimate, inputs=[session], inputs_kwargs=plan_widgets, outputs=plan_outputs, api_name="estimate")
        readvise.click(recommend_keep, inputs=[session], inputs_kwargs=all_inputs, outputs=recommend_outputs,
                       api_name="readvise").then(
            on_estimate, inputs=[session], inputs_kwargs=plan_widgets, outputs=plan_outputs, api_name="estimate_after_readvise")
        for name, widget in plan_widgets.items():
            if name in ("model", "dataset", "goal", "gpu", "num_gpus"):
                continue  # those change the advice: the plan step re-advises when you reach it
            widget.input(on_estimate, inputs=[session], inputs_kwargs=plan_widgets, outputs=plan_outputs,
                         api_name=f"edit_{name}", show_progress="hidden", trigger_mode="always_last")

        monitor_outputs = [watch, run_header, loss_plot, forgetting_plot, reward_time_plot, reward_kl_plot, alerts, timer,
                           reward_row]
        launch_btn.click(on_launch, inputs=[watch, session], inputs_kwargs=plan_widgets,
                         outputs=[walkthrough, *monitor_outputs], api_name="launch")
        timer.tick(on_poll, inputs=watch, outputs=monitor_outputs, api_name="poll", show_progress="hidden",
                   trigger_mode="always_last")
        stop_btn.click(on_stop, inputs=watch, outputs=monitor_outputs, api_name="stop")
        resume_btn.click(on_resume, inputs=watch, outputs=monitor_outputs, api_name="resume")
        log_btn.click(on_log_tail, inputs=watch, outputs=log_tail, api_name="log_tail")

        refresh_btn.click(on_runs, inputs=watch, outputs=[runs_table, open_run, compare_runs], api_name="runs")
        watch_btn.click(on_watch, inputs=[watch, open_run], outputs=[walkthrough, *monitor_outputs], api_name="watch")
        compare_runs.change(on_overlay, inputs=[compare_runs, compare_metric, watch], outputs=overlay_plot, api_name="overlay")
        compare_metric.change(on_overlay, inputs=[compare_runs, compare_metric, watch], outputs=overlay_plot,
                              api_name="overlay_metric")
        generate_btn.click(on_generate, inputs=[open_run, prompts, watch], outputs=samples_table, api_name="samples")
        export_btn.click(on_export, inputs=[open_run, export_reload, watch], outputs=[export_note, export_file], api_name="export")

        # On page load, independently (one failing does not block the others): the model card; the
        # dataset profile, then the advice and the plan's memory; the run to watch and the history.
        app.load(on_model, inputs=model, outputs=model_card, api_name="load_model_info")
        app.load(on_profile, inputs=[session, dataset, model], outputs=[session, profile_table, histogram],
                 api_name="load_profile").then(
            recommend_fresh, inputs=[session], inputs_kwargs=all_inputs, outputs=recommend_outputs,
            api_name="load_recommend").then(
            on_estimate, inputs=[session], inputs_kwargs=plan_widgets, outputs=plan_outputs,
            api_name="load_estimate")
        app.load(on_attach, inputs=watch, outputs=[walkthrough, *monitor_outputs], api_name="attach").then(
            on_runs, inputs=watch, outputs=[runs_table, open_run, compare_runs], api_name="load_runs")
    return app


# -- things the handlers do that are not layout -------------------------------------------------------------


def tail_text(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file (reads at most the last 64 KB)."""
    if not path.is_file():
        return f"({path.name} does not exist yet)"
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 65536))
        data = handle.read().decode("utf-8", "replace")
    return "\n".join(data.splitlines()[-lines:])


def generate_samples(config: AppConfig, run_dir: Path, prompts: list[str]) -> list[list[str]]:
    """Base and tuned completions for `prompts`, computed in a subprocess (torch never loads in the app)."""
    from advisor.errors import TunewiseError

    request = json.dumps({"run_dir": str(run_dir), "prompts": prompts, "max_new_tokens": 32})
    command = [sys.executable, str(Path(__file__).resolve()), "--generate-samples", request]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=config.generate_timeout_s,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        raise TunewiseError(f"samples: generation took longer than {config.generate_timeout_s:.0f} s; use fewer prompts",
                            field="prompts") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TunewiseError(f"samples: generation failed: {last}", field="run")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [[p, b, t] for p, b, t in zip(prompts, result["base"], result["tuned"])]


def _generate_main(request_json: str) -> int:
    """Subprocess entry: load base and tuned models of a run, generate greedily, print JSON. Imports torch."""
    request = json.loads(request_json)
    from advisor.plan import Plan

    run_dir = Path(request["run_dir"])
    plan = Plan.load(run_dir / "plan.yaml")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from advisor.plan import DEMO_MODEL_DIR

    base_name = str(DEMO_MODEL_DIR) if plan.model.name == "demo" else plan.model.name
    output = Path(plan.output) if plan.output else run_dir / "output"
    if not output.is_dir():
        candidates = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if not candidates:
            print(f"run {run_dir.name} has no output or checkpoint yet; wait for it to save one", file=sys.stderr)
            return 2
        output = candidates[-1]
    tokenizer = AutoTokenizer.from_pretrained(base_name)
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    base.eval()

    def complete(model, prompt: str) -> str:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=int(request.get("max_new_tokens", 32)), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    base_out = [complete(base, p) for p in request["prompts"]]
    if (output / "adapter_config.json").is_file():
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, str(output))
    else:
        tuned = AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32)
    tuned.eval()
    tuned_out = [complete(tuned, p) for p in request["prompts"]]
    print(json.dumps({"base": base_out, "tuned": tuned_out}))
    return 0


#: Export folders kept in `AppConfig.exports_dir` (older ones are deleted as new exports are made).
KEEP_EXPORTS = 4


@functools.lru_cache(maxsize=1)
def _private_exports_dir() -> Path:
    """This process's own folder for export archives (mode 0700, in the temp folder), made on the first
    export, so an app that never exports leaves nothing behind; removed at a clean exit."""
    folder = Path(tempfile.mkdtemp(prefix="tunewise-exports-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def export_folder(config: AppConfig) -> Path:
    """A new folder for one export archive, outside the runs folder (which the page never serves), in
    `config.exports_dir` (default `_private_exports_dir()`), where only the newest KEEP_EXPORTS are kept."""
    parent = config.exports_dir or _private_exports_dir()
    parent.mkdir(parents=True, exist_ok=True)
    old = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for folder in old[: max(0, len(old) - (KEEP_EXPORTS - 1))]:
        shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="export-", dir=parent))


def export_run(config: AppConfig, run_dir: Path, reload_16bit: bool = False) -> tuple[str, str]:
    """Merge a run's adapter into its 16-bit base (`tunewise merge`, in a subprocess: torch never loads in
    the app) and zip the result for download. A full fine-tuning run's output is zipped as it is. The
    archive goes to a folder of its own (`export_folder`), never into the run directory: the page serves
    the archive it returns (Gradio copies it into its cache), and nothing of the run itself."""
    from advisor.errors import TunewiseError
    from advisor.plan import Plan

    plan = Plan.load(run_dir / "plan.yaml")
    output = Path(plan.output) if plan.output else run_dir / "output"
    if not output.is_dir():
        raise TunewiseError(f"run: {run_dir.name} has no output yet (it saves one when it finishes or is stopped)",
                            field="run")
    if plan.method.method == "full":
        archive = shutil.make_archive(str(export_folder(config) / f"{run_dir.name}-full"), "zip", root_dir=output)
        return archive, f"Full fine-tuning: the output is already a whole model; zipped `{output.name}/` for download."
    command = [sys.executable, str(REPO_ROOT / "cli.py"), "merge", str(run_dir), "--json"]
    if reload_16bit:
        command.append("--reload-16bit")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=config.generate_timeout_s,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        raise TunewiseError(f"export: merging took longer than {config.generate_timeout_s:.0f} s", field="export") from None
    if done.returncode != 0:
        message = next((line[len("error: "):] for line in reversed(done.stderr.splitlines()) if line.startswith("error: ")),
                       (done.stderr.strip().splitlines() or ["no output"])[-1])
        raise TunewiseError(f"export: {message}", field="export")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    merged = Path(report["out_dir"])
    archive = shutil.make_archive(str(export_folder(config) / f"{run_dir.name}-merged"), "zip", root_dir=merged)
    note = (f"Merged into `{merged}` ({report['dtype']}). Largest logit difference, merged vs base + adapter, on "
            f"{len(report['prompts'])} prompts: {report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']:.3g}; "
            f"the adapter itself moves logits by up to {report['adapter_effect']:.3g}).")
    return archive, note


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="The Tunewise wizard in your browser.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="port (default 7860)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this user name and password")
    parser.add_argument("--demo-mode", action="store_true",
                        help="public-demo limits (on automatically when SPACE_ID is set): demo model only, bounded steps, one run at a time")
    parser.add_argument("--runs-dir", default=os.environ.get("TUNEWISE_RUNS_DIR", "runs"), help="where runs live (default ./runs)")
    parser.add_argument("--no-warm-worker", action="store_true",
                        help="do not keep a warm training process (with torch and TRL imported) ready for launches")
    parser.add_argument("--generate-samples", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not args.auth.split(":", 1)[0] or not args.auth.split(":", 1)[1]):
        parser.error("--auth must be USER:PASS with both parts non-empty")
    return args


def _ensure_warm(runs_dir: Path) -> int | None:
    from trainer import warm

    try:
        return warm.ensure_warm(runs_dir, owner_pid=os.getpid())
    except OSError as exc:
        logging.getLogger("tunewise").warning("no warm worker (launches start cold): %s", exc)
        return None


def _start_warm_worker(runs_dir: Path, host: str, port: int, wait_s: float = 120.0) -> None:
    """Once the page is served, start a warm trainer (trainer.warm) so a launch skips the heavy imports.

    Waiting for the server first keeps the worker's imports from slowing the app's start on a small
    machine. The worker exits when this app does (once no run it forked is going).
    """
    import socket

    address = ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            with socket.create_connection(address, timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    pid = _ensure_warm(runs_dir)
    if pid:
        logging.getLogger("tunewise").info("warm worker pid %s for %s", pid, runs_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate_samples:
        return _generate_main(args.generate_samples)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    on_space = bool(os.environ.get("SPACE_ID"))
    demo_mode = args.demo_mode or on_space
    runs_dir = Path(args.runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Export archives go to a private temp folder of this app's own (AppConfig.exports_dir), never into the
    # runs folder: the page serves no file of the runs folder (see blocked_paths below).
    config = AppConfig(runs_dir=runs_dir, demo_mode=demo_mode, uploads_dir=runs_dir / "_uploads",
                       warm_worker=not args.no_warm_worker)
    app = build_app(config)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    host = "0.0.0.0" if on_space and args.host == "127.0.0.1" else args.host
    css = CSS_PATH.read_text(encoding="utf-8") if CSS_PATH.is_file() else None
    import gradio as gr

    if not args.no_warm_worker:
        threading.Thread(target=_start_warm_worker, args=(runs_dir, host, args.port), daemon=True).start()
    from starlette.middleware import Middleware

    # Files: Gradio serves its own upload cache and the files handlers return (copied into that cache: the
    # export archive); nothing is added to allowed_paths, and the runs folder (plans, logs, uploaded data,
    # checkpoints) is blocked outright, wherever it lies. show_error=True: a refusal by Gradio's own input
    # checks reaches the page as its message (never a traceback; handler errors are friendly() messages).
    app.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=args.port, auth=auth, css=css, theme=gr.themes.Soft(primary_hue="indigo"),
        max_file_size="20mb" if demo_mode else None, blocked_paths=[str(runs_dir)], footer_links=["api", "gradio"],
        show_error=True, app_kwargs={"middleware": [Middleware(RequireLogin)]},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
