"""Tunewise in the browser: a five-step wizard from "which model?" to a tuned, exported adapter.

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--demo-mode] [--runs-dir runs]

Layout and event wiring only (see ../shared/style.md): the decisions live in
`advisor` (plans, memory, advice, dataset profiles, `advisor.wizard` for the
widgets-to-plan mapping, table rows and the demo's rules), the charts and the
monitor's text in `figures`, and everything that touches the runs folder in
`trainer` (`trainer.supervisor` launches, stops and resumes runs in their own
processes, `trainer.runs` keeps uploads and exports, `trainer.samples`
generates in a subprocess). The page talks to a run only through its
directory: it launches it, then tails `events.jsonl` from a byte offset kept
per browser session, so closing the browser or restarting this app never
stops a run. torch, transformers and TRL are never imported here.

The file reads top to bottom: the server's configuration and error shaping,
then `_layout` (one function per wizard step), `Handlers` (one method per
event, each returning {component: value}), `_wire` (every event with an
`api_name`, so the whole wizard can be driven with `gradio_client`, as
tests/test_app_api.py does), and `main`.

Demo mode (`--demo-mode`, or automatically on a Hugging Face Space where
SPACE_ID is set) lets visitors train only the bundled demo model, with bounded
steps, one run at a time, and old runs cleaned up; the limits are enforced in
the handlers, not only in the page. Each visitor sees and drives only the runs
launched from their own browser session and names their uploads by file name
(both kept in gr.State); messages show no server paths. In every mode the page
serves no file of the runs folder (only the export archive it hands out), and
with `--auth` every route but the login page needs the login.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import gradio as gr
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware

import figures
from advisor import wizard
from advisor.errors import TunewiseError, user_message
from advisor.profile import profile_dataset
from trainer import runs, samples, supervisor, warm
from trainer.events import EVENTS_FILE
from trainer.rundir import STDOUT_FILE, run_path, tail_lines
from trainer.status import events_so_far
from ui_parts import RequireLogin, number_with_named_range

REPO_ROOT = Path(__file__).resolve().parent
CSS_PATH = REPO_ROOT / "assets" / "ui.css"
LOG = logging.getLogger("tunewise.app")


@dataclass(frozen=True)
class AppConfig:
    """How this server runs."""

    runs_dir: Path = Path("runs")
    """Where run directories live (shared with `tunewise launch/runs/status`)."""
    demo_mode: bool = False
    """Public-demo limits: demo model only, bounded steps, one run at a time, old runs cleaned up."""
    demo_max_steps: int = wizard.DemoLimits.max_steps
    """Training steps per run at most in demo mode."""
    demo_keep_runs: int = 8
    """Runs kept on disk in demo mode."""
    poll_seconds: float = 1.0
    """How often the monitor step reads new events."""
    generate_timeout_s: float = 300.0
    """Longest a sample-generation or merge subprocess may take."""
    uploads_dir: Path = field(default=Path("runs") / "_uploads")
    """Where uploaded datasets are kept (under the runs folder, names sanitized)."""
    warm_worker: bool = False
    """Keep a warm trainer (trainer.warm) ready so launches skip the heavy imports (`main` turns it on)."""
    exports_dir: Path | None = None
    """Where export archives are written for download (a folder of their own outside the runs folder, which
    the page never serves; Gradio copies each archive into its cache to serve it). None: a private temp
    folder of this process, made on the first export and removed at a clean exit."""


# -- errors: a message in the page, never a traceback ------------------------------------------------------


def shows_errors_in_page(fn: Callable, shown: Callable[[str], str] | None = None) -> Callable:
    """Wrap an event handler so that any exception reaches the page as `gr.Error(message)`; `shown` edits
    each message first (the public demo cuts server paths out)."""
    shown = shown or (lambda text: text)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            exc.message = shown(exc.message)
            raise
        except Exception as exc:  # every handler: the page gets a message, the log gets the traceback
            if not isinstance(exc, TunewiseError):
                LOG.error("handler %s failed:\n%s", fn.__name__, traceback.format_exc())
            field_name = getattr(exc, "field", None)
            title = f"Check {field_name}" if field_name else ("Check your input" if isinstance(exc, TunewiseError) else "Error")
            raise gr.Error(shown(user_message(exc)), title=title, print_exception=False) from None

    return wrapper


# -- per-browser state (gr.State) -----------------------------------------------------------------------


def new_plan_state() -> dict:
    """The plan step's state: the dataset profile, the last advice, and (demo mode) this visitor's uploads
    by file name."""
    return {"advice": {}, "profile": None, "uploads": {}}


def new_monitor_state() -> dict:
    """The monitor's state: the run watched, how far its events.jsonl was read (byte offset), the events
    read so far, and the runs this session launched (`own`: in demo mode a visitor sees and drives only those)."""
    return {"run_id": None, "offset": 0, "events": [], "own": []}


def monitoring(state: dict, run_id: str | None) -> dict:
    """The monitor state, now watching `run_id` from its first event."""
    return {**state, "run_id": run_id, "offset": 0, "events": [], "drawn": False}






# -- layout: one function per wizard step, each returning its widgets by name ------------------------------


class Page(SimpleNamespace):
    """Every widget of the page by name (a plan widget's name is its key in advisor.wizard.PLAN_WIDGETS),
    plus the Blocks app, the walkthrough and the two per-browser states; and the groups the events use."""

    def group(self, *names: str) -> list:
        return [getattr(self, name) for name in names]

    @property
    def plan_widgets(self) -> dict:
        """The widgets `wizard.plan_from_widgets` reads, by name."""
        return {name: getattr(self, name) for name in wizard.PLAN_WIDGETS}

    @property
    def advisor_widgets(self) -> dict:
        """What the advice depends on (step 1 and 2's choices)."""
        return {name: getattr(self, name) for name in wizard.ADVISOR_WIDGETS}

    @property
    def advised_widgets(self) -> dict:
        """The plan widgets the advice fills in."""
        return {name: getattr(self, name) for name in wizard.ADVISED_WIDGETS}

    @property
    def plan_outputs(self) -> list:
        return self.group("memory_table", "memory_plot", "fit_table", "recommendations", "plan_status",
                          "explanations", "cli_text", "yaml_text", "pilot_cost")

    @property
    def recommend_outputs(self) -> list:
        return [self.plan_state, *self.advised_widgets.values(), self.guide_table, self.guide_note, self.advice_notes]

    @property
    def monitor_outputs(self) -> list:
        return [self.monitor_state, *self.group("run_header", "loss_plot", "forgetting_plot", "reward_time_plot",
                                                "reward_kl_plot", "alerts", "timer", "reward_row")]

    @property
    def history_outputs(self) -> list:
        return self.group("runs_table", "open_run", "compare_runs")


def _step_model(gr, Number, wizard) -> dict:  # noqa: N803 (Number stands for gr.Number)
    with gr.Step("Model & hardware", id=1, elem_id="step-model"):
        with gr.Row():
            with gr.Column(scale=3):
                model = gr.Dropdown(
                    choices=wizard.model_choices(), value="demo", label="Model", allow_custom_value=True,
                    filterable=True, elem_id="model",
                    info="Search the catalogue, or type a hub id (owner/name), a local folder, or a size like 7B.")
                with gr.Row():
                    gpu = gr.Dropdown(choices=wizard.gpu_choices(), value=wizard.NO_GPU, label="GPU", elem_id="gpu",
                                      info="What you will train on; the plan is sized for it.")
                    num_gpus = Number("num_gpus", value=1, precision=0, label="Number of GPUs", elem_id="num_gpus")
            with gr.Column(scale=4):
                model_card = gr.Markdown(elem_id="model-card")
        with gr.Row():
            next_1 = gr.Button("Next: data & goal", variant="primary", elem_id="next-1", scale=0, min_width=200)
            history_1 = gr.Button("Run history", elem_id="open-history", scale=0, min_width=140)
    return dict(model=model, gpu=gpu, num_gpus=num_gpus, model_card=model_card, next_1=next_1, history_1=history_1)


def _step_data(gr, wizard) -> dict:
    with gr.Step("Data & goal", id=2, elem_id="step-data"):
        with gr.Row():
            with gr.Column(scale=3):
                dataset = gr.Dropdown(
                    choices=wizard.dataset_choices(), value="demo-sft", allow_custom_value=True, label="Dataset",
                    elem_id="dataset",
                    info="A bundled demo set, a local JSONL / JSON / CSV / Parquet path, or upload a file below.")
                upload = gr.File(label="Upload a dataset", file_types=[".jsonl", ".json", ".csv", ".parquet", ".txt"],
                                 file_count="single", height=90, elem_id="upload")
                goal = gr.Dropdown(choices=list(wizard.GOAL_CHOICES), value="sft", label="Stage or pipeline",
                                   elem_id="goal")
                task = gr.Radio(choices=list(wizard.TASK_CHOICES), value="instruction", label="Task complexity",
                                elem_id="task")
                domain = gr.Radio(choices=list(wizard.DOMAIN_CHOICES), value="medium",
                                  label="How far is the task from pretraining?", elem_id="domain")
                priority = gr.Radio(choices=list(wizard.PRIORITY_CHOICES), value="balanced", label="Quality or memory?",
                                    elem_id="priority")
                quantized_inference = gr.Checkbox(value=False, label="The tuned model will be served quantized",
                                                  elem_id="quantized-inference")
            with gr.Column(scale=4):
                profile_table = gr.Dataframe(headers=["profile", ""], value=[], interactive=False, wrap=True,
                                             label="Dataset profile", elem_id="profile-table")
                histogram = gr.Plot(label="Token lengths", elem_id="histogram")
        with gr.Row():
            back_2 = gr.Button("Back", elem_id="back-2", scale=0, min_width=100)
            next_2 = gr.Button("Next: plan and advice", variant="primary", elem_id="next-2", scale=0, min_width=220)
    return dict(dataset=dataset, upload=upload, goal=goal, task=task, domain=domain, priority=priority,
                quantized_inference=quantized_inference, profile_table=profile_table, histogram=histogram,
                back_2=back_2, next_2=next_2)


def _plan_editor(gr, Number) -> dict:  # noqa: N803
    """Every plan value the page edits; each change updates memory and fit at once."""
    w = {}
    with gr.Row():
        w["method"] = gr.Radio(choices=[("Full fine-tuning", "full"), ("LoRA", "lora"), ("QLoRA", "qlora")],
                               value="lora", label="Method", elem_id="method")
        w["precision"] = gr.Dropdown(choices=["bf16", "fp16", "fp32", "amp"], value="bf16", label="Precision")
        w["optimizer"] = gr.Dropdown(choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"],
                                     value="adamw", label="Optimizer")
        w["shard"] = gr.Dropdown(choices=[("none (DDP)", "none"), ("ZeRO-2", "zero2"), ("ZeRO-3 / FSDP", "zero3")],
                                 value="none", label="Sharding")
    with gr.Row():
        w["lora_rank"] = Number("lora_rank", value=16, precision=0, label="LoRA rank", elem_id="lora-rank")
        w["lora_alpha"] = Number("lora_alpha", value=32, label="LoRA alpha")
        w["lora_dropout"] = Number("lora_dropout", value=0.05, step=0.01, label="LoRA dropout")
        w["lora_targets"] = gr.Dropdown(choices=["q_proj", "k_proj", "v_proj", "o_proj"], multiselect=True,
                                        allow_custom_value=True, value=["q_proj", "k_proj", "v_proj", "o_proj"],
                                        label="Target modules", scale=2)
        w["double_quant"] = gr.Checkbox(value=True, label="Double quantization (QLoRA)")
    with gr.Row():
        w["learning_rate"] = Number("learning_rate", value=2e-4, label="Learning rate", step=1e-5, elem_id="learning-rate")
        w["warmup_ratio"] = Number("warmup_ratio", value=0.05, step=0.01, label="Warmup share")
        w["lr_scheduler"] = gr.Dropdown(choices=["cosine", "linear", "constant", "constant_with_warmup"],
                                        value="cosine", label="LR schedule")
        w["epochs"] = Number("epochs", value=1, label="Epochs")
        w["max_steps"] = Number("max_steps", value=wizard.DemoLimits.max_steps, precision=0,
                                label="Max steps (0: run the epochs)", elem_id="max-steps")
    with gr.Row():
        w["micro_batch"] = Number("micro_batch", value=4, precision=0, label="Micro-batch", elem_id="micro-batch")
        w["grad_accum"] = Number("grad_accum", value=1, precision=0, label="Gradient accumulation")
        w["seq_len"] = Number("seq_len", value=512, precision=0, label="Sequence length", elem_id="seq-len")
        w["gradient_checkpointing"] = gr.Checkbox(value=False, label="Gradient checkpointing")
        w["packing"] = gr.Checkbox(value=False, label="Packing")
        w["attn"] = gr.Dropdown(choices=["sdpa", "eager"], value="sdpa", label="Attention")
    with gr.Row():
        w["replay_fraction"] = Number("replay_fraction", value=0.0, step=0.01, label="Replay share (forgetting)")
        w["ewc_lambda"] = Number("ewc_lambda", value=0.0, label="EWC strength")
        w["forgetting_eval_every"] = Number("forgetting_eval_every", value=10, precision=0,
                                            label="Forgetting check every (steps)")
        w["forgetting_threshold"] = Number("forgetting_threshold", value=20.0, label="Forgetting alert at +% loss")
        w["stop_on_threshold"] = gr.Checkbox(value=False, label="Stop when forgetting crosses it")
        w["beta"] = Number("beta", value=0.1, step=0.05, label="DPO beta")
        w["kl_coef"] = Number("kl_coef", value=0.05, step=0.01, label="PPO KL coefficient")
        w["preference_lr"] = Number("preference_lr", value=None, label="Preference learning rate",
                                    info="DPO / PPO steps of a pipeline (empty: the learning rate above)")
    w["readvise"] = gr.Button("Re-advise, keeping my changes", size="sm", elem_id="readvise")
    return w


def _pilot_panel(gr, figures) -> dict:
    """The learning-rate pilot in the plan step: its expected cost before the click, then its live charts."""
    w = {"pilot_state": gr.State(dict)}  # this browser's pilot: run id, events read so far and their offset
    with gr.Accordion("Check the learning rate on my data", open=False, elem_id="pilot"):
        w["pilot_cost"] = gr.Markdown(elem_id="pilot-cost")
        with gr.Row():
            w["pilot_btn"] = gr.Button("Check the learning rate on my data", elem_id="pilot-btn", scale=0, min_width=280)
            w["pilot_stop_btn"] = gr.Button("Stop the check (keeps what it measured)", elem_id="pilot-stop", scale=0,
                                            min_width=260)
        w["pilot_status"] = gr.Markdown(elem_id="pilot-status")
        with gr.Row():
            w["pilot_loss_plot"] = gr.Plot(figures.pilot_loss_figure([]), show_label=False, elem_id="pilot-loss-plot")
            w["pilot_rate_plot"] = gr.Plot(figures.pilot_rate_figure([]), show_label=False, elem_id="pilot-rate-plot")
        w["pilot_timer"] = gr.Timer(1.0, active=False)
    return w


def _step_plan(gr, Number) -> dict:  # noqa: N803
    with gr.Step("Plan", id=3, elem_id="step-plan"):
        w = {"plan_status": gr.Markdown(elem_id="plan-status")}
        with gr.Row():
            with gr.Column(scale=5):
                w["memory_plot"] = gr.Plot(label="Memory per GPU", show_label=False, elem_id="memory-plot")
            with gr.Column(scale=6):
                w["memory_table"] = gr.Dataframe(interactive=False, label="Memory per GPU: Full / LoRA / QLoRA",
                                                 elem_id="memory-table", wrap=True)
                w["fit_table"] = gr.Dataframe(interactive=False, label="GPU fit for the plan's method", wrap=True,
                                              elem_id="fit-table")
        w["advice_notes"] = gr.Markdown(elem_id="advice-notes")
        w["recommendations"] = gr.Dataframe(headers=["setting", "value", "why"], interactive=False, wrap=True,
                                            label="Recommendations, each with its reason", elem_id="recommendations",
                                            column_widths=["18%", "14%", "68%"])
        w.update(_pilot_panel(gr, figures))
        with gr.Accordion("Edit the plan: every value updates memory and fit at once", open=True, elem_id="plan-editor"):
            w.update(_plan_editor(gr, Number))
        with gr.Row():
            with gr.Column(scale=3):
                w["guide_table"] = gr.Dataframe(interactive=False, wrap=True, elem_id="guide-table",
                                                label="The guide's quick reference beside our estimate (GB)")
            with gr.Column(scale=2):
                w["guide_note"] = gr.Markdown(elem_id="guide-note")
        with gr.Accordion("How each memory figure is computed", open=False):
            w["explanations"] = gr.Dataframe(headers=["component", "how"], interactive=False, wrap=True,
                                             column_widths=["20%", "80%"])
        with gr.Accordion("Show as YAML / CLI", open=False, elem_id="show-yaml"):
            w["cli_text"] = gr.Code(language="shell", label="Run it from a terminal", elem_id="cli-text")
            w["yaml_text"] = gr.Code(language="yaml", label="plan.yaml", elem_id="yaml-text")
        with gr.Row():
            w["back_3"] = gr.Button("Back", elem_id="back-3", scale=0, min_width=100)
            w["launch_btn"] = gr.Button("Launch training", variant="primary", elem_id="launch", scale=0, min_width=200)
    return w


def _step_monitor(gr, figures, poll_seconds: float) -> dict:
    with gr.Step("Launch & monitor", id=4, elem_id="step-monitor"):
        w = {"run_header": gr.HTML(figures.run_header_html(None, None), elem_id="run-header")}
        with gr.Row():
            w["stop_btn"] = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="stop", scale=0, min_width=220)
            w["resume_btn"] = gr.Button("Resume from the last checkpoint", elem_id="resume", scale=0, min_width=260)
            w["log_btn"] = gr.Button("Show the log tail", elem_id="show-log", scale=0, min_width=170)
            w["to_results"] = gr.Button("Results & runs", elem_id="next-4", scale=0, min_width=150)
        with gr.Row():
            w["loss_plot"] = gr.Plot(figures.loss_figure([]), label="Loss", show_label=False, elem_id="loss-plot")
            w["forgetting_plot"] = gr.Plot(figures.forgetting_figure([]), label="Forgetting", show_label=False,
                                           elem_id="forgetting-plot")
        # Shown once the run logs a reward or a KL (preference stages).
        with gr.Row(visible=False, elem_id="reward-row") as reward_row:
            w["reward_time_plot"] = gr.Plot(figures.reward_kl_time_figure([]), label="Reward and KL", show_label=False,
                                            elem_id="reward-time-plot")
            w["reward_kl_plot"] = gr.Plot(figures.reward_vs_kl_figure([]), label="Reward against KL", show_label=False,
                                          elem_id="reward-kl-plot")
        w["reward_row"] = reward_row
        w["alerts"] = gr.Markdown(figures.alerts_markdown([]), label="Alerts", elem_id="alerts")
        w["log_tail"] = gr.Code(language=None, label="stdout.log (last lines)", visible=False, elem_id="log-tail")
        w["timer"] = gr.Timer(poll_seconds, active=False)
    return w


def _step_results(gr, wizard) -> dict:
    with gr.Step("Results & runs", id=5, elem_id="step-results"):
        w = {}
        with gr.Row():
            w["refresh_btn"] = gr.Button("Refresh the history", scale=0, min_width=180, elem_id="refresh-runs")
        w["runs_table"] = gr.Dataframe(headers=wizard.RUN_HEADERS, interactive=False, wrap=True, label="Run history",
                                       elem_id="runs-table")
        with gr.Row():
            w["open_run"] = gr.Dropdown(choices=[], label="Run", elem_id="open-run", scale=2)
            w["watch_btn"] = gr.Button("Watch in step 4", scale=0, min_width=170, elem_id="watch")
        with gr.Row():
            w["compare_runs"] = gr.Dropdown(choices=[], multiselect=True, label="Overlay the curves of", scale=3,
                                            elem_id="compare-runs")
            w["compare_metric"] = gr.Dropdown(choices=["loss", "eval_loss", "learning_rate", "grad_norm", "rewards/margins",
                                                       "objective/kl", "reward", "kl_sequence"],
                                              value="loss", allow_custom_value=True, label="Metric", scale=1)
        w["overlay_plot"] = gr.Plot(label="Runs compared", elem_id="overlay-plot")
        with gr.Accordion("Base vs tuned: sample generations side by side", open=False, elem_id="samples"):
            w["prompts"] = gr.Textbox(lines=3, label="Prompts (one per line)",
                                      value="Convert 2011-09-24 to day, month and year.\nPlease spell out the date 2016-05-11.")
            w["generate_btn"] = gr.Button("Generate with the base and the tuned model", elem_id="generate")
            w["samples_table"] = gr.Dataframe(headers=["prompt", "base", "tuned"], interactive=False, wrap=True)
        with gr.Accordion("Merge / export", open=False, elem_id="export"):
            w["export_reload"] = gr.Checkbox(value=False, label="QLoRA run: merge into the base reloaded in 16 bit "
                                             "(the adapter was trained against 4-bit weights)")
            w["export_btn"] = gr.Button("Merge the adapter into the base and export", elem_id="export-btn")
            w["export_note"] = gr.Markdown()
            w["export_file"] = gr.File(label="Download", interactive=False)
    return w


def _layout(config: AppConfig) -> Page:
    """The page: a header, the demo banner, and the five steps of the walkthrough."""


    Number = number_with_named_range()  # noqa: N806 (stands for gr.Number)
    with gr.Blocks(title="Tunewise: plan, advise and run fine-tuning") as blocks:
        plan_state = gr.State(new_plan_state)  # this browser's plan step: dataset profile, last advice, uploads
        monitor_state = gr.State(new_monitor_state)  # this browser's monitor: the run watched, its events
        gr.HTML("<div class='tw-header'><div class='tw-logo'>Tunewise</div>"
                "<div class='tw-tagline'>Plan the memory, get the settings with their reasons, train in the background "
                "and watch loss, reward vs KL and forgetting live.</div></div>")
        if config.demo_mode:
            gr.HTML(f"<div class='tw-demo'>Public demo: training is limited to the bundled demo model, "
                    f"{config.demo_max_steps} steps, one run at a time. Planning works for any model.</div>")
        with gr.Walkthrough(selected=1, elem_id="wizard") as walkthrough:
            widgets = {**_step_model(gr, Number, wizard), **_step_data(gr, wizard), **_step_plan(gr, Number),
                       **_step_monitor(gr, figures, config.poll_seconds), **_step_results(gr, wizard)}
    page = Page(blocks=blocks, walkthrough=walkthrough, plan_state=plan_state, monitor_state=monitor_state, **widgets)
    assert set(wizard.PLAN_WIDGETS) <= set(widgets), "every plan widget is on the page"
    return page


# -- handlers: one method per event; each returns {component: value} for the outputs it changes --------------


class Handlers:
    """What each event does. The rules live in advisor / trainer; a handler reads the widgets, calls them, and
    returns the components to update ({component: value}; outputs it leaves out keep their value).

    Two per-browser states reach the handlers: `plan_state` (new_plan_state) and `monitor_state`
    (new_monitor_state). In demo mode a visitor's uploads are named in the page by file name only
    (`plan_state["uploads"]` maps each name to the kept file, for this session alone), and a visitor sees
    and drives only the runs launched from this session (`monitor_state["own"]`)."""

    def __init__(self, config: AppConfig, page: Page):

        self.config, self.page = config, page
        self.demo_limits = wizard.DemoLimits(max_steps=config.demo_max_steps, keep_runs=config.demo_keep_runs)
        # The demo's one-run-at-a-time check and the launch must not interleave between requests (the queue
        # runs handlers concurrently): both happen under this lock.
        self.launch_lock = threading.Lock()
        self.uploaded_here = page.blocks.upload_file_set  # every file Gradio's upload route received

    # -- the rules every handler applies -------------------------------------------------------------------

    def shown(self, text: Any) -> Any:
        """What a visitor may see of a message, log or note: demo mode cuts server paths to file names."""
        if not self.config.demo_mode or not isinstance(text, str):
            return text


        return wizard.hide_server_paths(text, [self.config.runs_dir, self.config.uploads_dir, REPO_ROOT,
                                        Path(get_upload_folder()), Path(tempfile.gettempdir())])

    def dataset_path(self, plan_state: dict, dataset: Any) -> Any:
        """The file behind a dataset name this visitor uploaded (demo mode), else `dataset` itself."""
        if self.config.demo_mode and isinstance(dataset, str):
            return (plan_state.get("uploads") or {}).get(dataset.strip(), dataset)
        return dataset

    def demo_guard(self, model: Any = None, dataset: Any = None, plan_state: dict | None = None) -> None:
        if self.config.demo_mode:
    
            uploads = ((plan_state or {}).get("uploads") or {}).values()
            wizard.check_demo_inputs(model, self.dataset_path(plan_state or {}, dataset), uploads)

    def run_dir(self, monitor_state: dict, run_id: Any) -> Path:
        """The directory of a run this visitor may open (TunewiseError naming the field otherwise)."""
        path = run_path(self.config.runs_dir, run_id)
        if self.config.demo_mode and run_id not in (monitor_state.get("own") or []):
            raise TunewiseError(f"run: {run_id!r} is not one of your runs; the public demo shows each visitor "
                                "only the runs they launched from this page", field="run")
        return path

    def own_runs(self, monitor_state: dict) -> list[str] | None:
        """The runs this visitor may list: their own in demo mode, every run (None) otherwise."""
        return list(monitor_state.get("own") or []) if self.config.demo_mode else None

    # -- steps 1 to 3: model, data, plan -----------------------------------------------------------------

    def on_model(self, model):

        self.demo_guard(model=model)
        spec, counts = wizard.model_summary(model)
        return {self.page.model_card: wizard.model_card_markdown(spec, counts)}

    def on_upload(self, plan_state, upload):


        if not upload:
            return {}
        if str(Path(upload).resolve()) not in {str(Path(p).resolve()) for p in self.uploaded_here}:
            # Gradio fetches a URL named in the request itself; only files sent to its upload route count.
            raise TunewiseError("dataset: only a file sent through the upload box can be used here, not a "
                                "file named by its address", field="data.dataset")
        limit = self.demo_limits.max_upload_bytes if self.config.demo_mode else None
        kept = runs.keep_upload(self.config.uploads_dir, upload, max_bytes=limit)
        if not self.config.demo_mode:
            return {self.page.dataset: gr.update(value=str(kept), choices=wizard.dataset_choices() + [(kept.name, str(kept))])}
        uploads = {**(plan_state.get("uploads") or {}), kept.name: str(kept)}
        return {self.page.dataset: gr.update(value=kept.name, choices=wizard.dataset_choices() + [(n, n) for n in uploads]),
                self.page.plan_state: {**plan_state, "uploads": uploads}}

    def on_profile(self, plan_state, dataset, model):

        if not isinstance(dataset, str) or not dataset.strip():
            wizard.text_value(dataset, "data.dataset", wizard.TEXT_WIDGETS["dataset"])  # not text: says so
            raise TunewiseError("data.dataset: no dataset chosen; pick a bundled one or upload a file"
                                + ("" if self.config.demo_mode else ", or type a file path"), field="data.dataset")
        model = wizard.text_value(model, "model.name", wizard.TEXT_WIDGETS["model"])
        self.demo_guard(model=model, dataset=dataset, plan_state=plan_state)
        profile = profile_dataset(self.dataset_path(plan_state, dataset), model or None)
        histogram = figures.token_histogram_figure(profile.histogram.edges, profile.histogram.counts,
                                                   profile.recommended_seq_len, profile.tokens.p95)
        return {self.page.plan_state: {**plan_state, "profile": profile.to_dict()},
                self.page.profile_table: wizard.profile_rows(profile), self.page.histogram: histogram}

    def recommend(self, plan_state, keep_changes: bool, values: dict) -> dict:
        """Ask the advisor (keeping the plan widgets the user changed when `keep_changes`) and fill them in."""


        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        advisor_values = {name: values[name] for name in wizard.ADVISOR_WIDGETS}
        overrides = {name: values[name] for name in wizard.ADVISED_WIDGETS} if keep_changes else None
        pilot = plan_state.get("pilot") or {}
        same = all(pilot.get(key) == values.get(key) for key in ("model", "dataset", "goal"))
        advised = wizard.advise(advisor_values, plan_state.get("profile"), overrides,
                                max_steps=wizard.step_cap(values.get("max_steps")), measured_lr=pilot if pilot and same else None)
        widget_values = wizard.widgets_from_plan(advised.plan)
        guide_headers, guide_rows = wizard.guide_rows()
        updates = {widget: (gr.update(value=widget_values[name], choices=advised.target_choices)
                            if name == "lora_targets" else widget_values[name])
                   for name, widget in self.page.advised_widgets.items()}
        return {self.page.plan_state: {**plan_state, "advice": advised.values}, **updates,
                self.page.guide_table: {"headers": guide_headers, "data": guide_rows},
                self.page.guide_note: wizard.guide_note(), self.page.advice_notes: advised.notes_markdown}

    def on_recommend(self, plan_state, **values):
        return self.recommend(plan_state, False, values)

    def on_readvise(self, plan_state, **values):
        return self.recommend(plan_state, True, values)

    def on_estimate(self, plan_state, **values):

        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        plan = wizard.plan_from_widgets(values)  # an upload keeps its name here: the page shows the plan
        view = wizard.plan_view(plan)
        (headers, memory_rows), (fit_headers, fit_rows) = view.memory, view.fit
        p = self.page
        return {
            p.memory_table: {"headers": headers, "data": memory_rows},
            p.memory_plot: figures.memory_figure(view.stacked, view.gpu_bytes, view.gpu_label),
            p.fit_table: {"headers": fit_headers, "data": fit_rows},
            p.recommendations: wizard.recommendation_rows(plan_state.get("advice") or {}, wizard.widgets_from_plan(plan)),
            p.plan_status: view.status_markdown,
            p.explanations: view.explanations,
            p.cli_text: wizard.train_command(plan),
            p.yaml_text: wizard.plan_yaml(plan),
            p.pilot_cost: self.pilot_cost(plan, plan_state.get("profile")),
        }

    # -- step 3: the learning-rate pilot (trainer/pilot.py) ---------------------------------------------------

    def pilot_cost(self, plan, profile: dict | None) -> str:
        """What the check would do and cost, shown before the click (or why it cannot run for this plan)."""
        from advisor.pilot import plan_pilot

        profile = profile or {}
        try:
            design = plan_pilot(plan, examples=profile.get("examples") or None,
                                tokens=(profile.get("tokens") or {}).get("estimated_total") or None)
        except TunewiseError as exc:
            return f"The check cannot run for this plan: {user_message(exc)}"
        return (f"Short runs at {len(design.rates)} learning rates on your model and data, scored by held-out loss: "
                f"{design.describe()}. **Expected cost: about {figures.format_duration(design.expected_s)}.**")

    def pilot_view(self, pilot_state: dict, events: list, state: str | None) -> dict:
        p = self.page
        return {p.pilot_status: self.shown(figures.pilot_markdown(events, state)),
                p.pilot_loss_plot: figures.pilot_loss_figure(events), p.pilot_rate_plot: figures.pilot_rate_figure(events)}

    def on_pilot(self, pilot_state, monitor_state, plan_state, **values):
        from trainer.pilot import pilot_design

        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        plan = wizard.plan_from_widgets({**values, "dataset": self.dataset_path(plan_state, values.get("dataset"))})
        with self.launch_lock:
            if self.config.demo_mode:
                plan, _ = wizard.admit_demo_run(plan, self.demo_limits, runs.active_runs(self.config.runs_dir),
                                                monitor_state.get("own") or [])
            design = pilot_design(plan)
            run_id = supervisor.launch(plan, self.config.runs_dir, pilot=design.to_dict())
        gr.Info(f"Checking the learning rate: {design.describe()}")
        state = {"run_id": run_id, "offset": 0, "events": [], "model": values.get("model"),
                 "dataset": values.get("dataset"), "goal": values.get("goal"), "method": plan.method.method}
        return {self.page.pilot_state: state, self.page.pilot_timer: gr.Timer(active=True),
                self.page.monitor_state: {**monitor_state, "own": [*(monitor_state.get("own") or []), run_id]},
                **self.pilot_view(state, [], "queued")}

    def pilot_poll(self, pilot_state, plan_state, **values):
        """New pilot events redrawn; once it has chosen a rate, the rate goes into the plan with its reason."""
        from advisor.recommend import Advice
        from trainer.pilot import read_result

        p = self.page
        run_id = (pilot_state or {}).get("run_id")
        if not run_id:
            return {p.pilot_timer: gr.Timer(active=False)}
        try:
            events, offset = supervisor.read_run_events(run_id, pilot_state.get("offset", 0), self.config.runs_dir)
            status = supervisor.status(run_id, self.config.runs_dir)
        except TunewiseError:  # its directory was deleted (the demo's clean-up): nothing more to read
            return {p.pilot_timer: gr.Timer(active=False)}
        events = pilot_state.get("events", []) + events
        pilot_state = {**pilot_state, "offset": offset, "events": events}
        update = {p.pilot_state: pilot_state, p.pilot_timer: gr.Timer(active=status.active),
                  **self.pilot_view(pilot_state, events, status.state)}
        result = read_result(run_path(self.config.runs_dir, run_id))
        if status.active or result.get("status") != "finished" or pilot_state.get("applied"):
            return update
        rate, reason = result["chosen_rate"], result["reason"]
        pilot_state["applied"] = True
        measured = {"rate": rate, "reason": reason, "method": pilot_state.get("method"),
                    "model": pilot_state.get("model"), "dataset": pilot_state.get("dataset"),
                    "goal": pilot_state.get("goal")}
        advice = {**(plan_state.get("advice") or {}), "learning_rate": Advice(rate, reason, "measured_lr")}
        plan = wizard.plan_from_widgets({**values, "learning_rate": rate})
        gr.Info(f"Learning rate set to {rate:.2e}, measured on your data.")
        return {**update, p.plan_state: {**plan_state, "advice": advice, "pilot": measured}, p.learning_rate: rate,
                p.recommendations: wizard.recommendation_rows(advice, wizard.widgets_from_plan(plan)),
                p.cli_text: wizard.train_command(plan), p.yaml_text: wizard.plan_yaml(plan)}

    def on_pilot_stop(self, pilot_state):
        run_id = (pilot_state or {}).get("run_id")
        if not run_id:
            raise TunewiseError("pilot: no check is running; start one with the button above", field="pilot")
        supervisor.request_stop(run_id, self.config.runs_dir, reason="stopped from the plan step")
        gr.Info("Stopping the check: the candidate in progress ends, and what was measured is kept.")
        return {self.page.pilot_timer: gr.Timer(active=True)}

    # -- step 4: launch and monitor ------------------------------------------------------------------------

    def poll(self, monitor_state):
        """Read the new bytes of the watched run's events.jsonl and redraw (only when something arrived);
        the timer is switched off once the run has ended and everything was read."""


        p = self.page
        run_id = monitor_state.get("run_id")
        if not run_id:
            return {p.monitor_state: monitor_state, p.timer: gr.Timer(active=False)}
        events, offset = supervisor.read_run_events(run_id, monitor_state.get("offset", 0), self.config.runs_dir)
        try:
            status = supervisor.status(run_id, self.config.runs_dir)
        except TunewiseError:  # the run directory was deleted: show what was read
            status = None
        all_events = monitor_state.get("events", []) + events
        monitor_state = {**monitor_state, "offset": offset, "events": all_events}
        still_going = status is not None and status.state in ("queued", "running")
        update = {p.monitor_state: monitor_state, p.timer: gr.Timer(active=still_going or bool(events)),
                  p.run_header: self.shown(figures.run_header_html(run_id, figures.run_progress(all_events), status))}
        if not events and monitor_state.get("drawn"):
            return update
        monitor_state["drawn"] = True
        series = figures.reward_kl_series(all_events)
        return {**update, p.loss_plot: figures.loss_figure(all_events),
                p.forgetting_plot: figures.forgetting_figure(all_events),
                p.reward_time_plot: figures.reward_kl_time_figure(all_events),
                p.reward_kl_plot: figures.reward_vs_kl_figure(all_events),
                p.alerts: figures.alerts_markdown(figures.alert_messages(all_events)),
                p.reward_row: gr.Row(visible=bool(series["reward"][0] or series["kl"][0]))}

    def watch(self, monitor_state: dict, run_id: str) -> dict:
        """Watch `run_id` in step 4 from its first event."""
        return {self.page.walkthrough: gr.Walkthrough(selected=4), **self.poll(monitoring(monitor_state, run_id))}

    def on_launch(self, monitor_state, plan_state, **values):


        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        plan = wizard.plan_from_widgets({**values, "dataset": self.dataset_path(plan_state, values.get("dataset"))})
        notes: list[str] = []
        with self.launch_lock:
            if self.config.demo_mode:
                plan, notes = wizard.admit_demo_run(plan, self.demo_limits, runs.active_runs(self.config.runs_dir),
                                                    monitor_state.get("own") or [])
                runs.cleanup_old_runs(self.config.runs_dir, self.config.uploads_dir, self.demo_limits.keep_runs - 1)
            # An upload goes into the run's own folder: the run keeps its data when old uploads are cleaned.
            uploaded = runs.is_upload(plan.data.dataset, self.config.uploads_dir)
            run_id = supervisor.launch(plan, self.config.runs_dir, copy_dataset=uploaded)
        if self.config.warm_worker:  # the worker may have gone (idle, or orphaned by a restart): ready one for next time
            threading.Thread(target=warm.ready_for, args=(self.config.runs_dir, os.getpid()), daemon=True).start()
        if notes:
            gr.Info("Demo limits applied: " + "; ".join(notes))
        return self.watch({**monitor_state, "own": [*(monitor_state.get("own") or []), run_id]}, run_id)

    def current_run(self, monitor_state: dict, what: str) -> str:
        """The watched run's id (one this visitor may drive), or TunewiseError saying there is nothing to `what`."""
        run_id = monitor_state.get("run_id")
        if not run_id:
            raise TunewiseError(f"run: nothing to {what}; launch a run or open one from the history first", field="run")
        self.run_dir(monitor_state, run_id)
        return run_id

    def on_stop(self, monitor_state):


        run_id = self.current_run(monitor_state, "stop")
        # stop() waits for the run to save and exit (killing it after 30 s): do that in the background so the
        # page stays live; the monitor shows "stopped" when it is done.
        threading.Thread(target=supervisor.stop, args=(run_id,), kwargs={"runs_dir": self.config.runs_dir, "timeout": 30},
                         daemon=True).start()
        gr.Info(f"Stop requested: {run_id} saves a checkpoint and ends after the current step.")
        return self.poll(monitor_state)

    def on_resume(self, monitor_state):


        run_id = self.current_run(monitor_state, "resume")
        with self.launch_lock:
            if self.config.demo_mode and runs.active_runs(self.config.runs_dir):
                raise TunewiseError("queue: the public demo trains one run at a time; wait for the current run to end",
                                    field="queue")
            supervisor.resume(run_id, self.config.runs_dir)
        gr.Info(f"Resuming {run_id} from its last checkpoint.")
        return self.poll(monitor_state)

    def on_log_tail(self, monitor_state):


        run_id = monitor_state.get("run_id")
        if not run_id:
            return {self.page.log_tail: gr.update(visible=True, value="(no run selected)")}
        log = self.run_dir(monitor_state, run_id) / STDOUT_FILE
        text = "\n".join(tail_lines(log, 60)) if log.is_file() else f"({log.name} does not exist yet)"
        return {self.page.log_tail: gr.update(visible=True, value=self.shown(text))}

    def on_attach(self, monitor_state):
        """On page load: watch the newest running run (in demo mode, only one of this visitor's), so reopening
        the browser shows it again."""

        if monitor_state.get("run_id"):
            return self.poll(monitor_state)
        running = runs.active_runs(self.config.runs_dir)
        mine = self.own_runs(monitor_state)
        running = [status for status in running if mine is None or status.run_id in mine]
        return self.watch(monitor_state, running[0].run_id) if running else self.poll(monitor_state)

    # -- step 5: results and runs --------------------------------------------------------------------------

    def on_runs(self, monitor_state):


        statuses = runs.history(self.config.runs_dir, only=self.own_runs(monitor_state))
        ids = [status.run_id for status in statuses]
        # The newest run is picked and its curve drawn, so the step never opens on an empty chart.
        return {self.page.runs_table: [wizard.run_row(status) for status in statuses],
                self.page.open_run: gr.update(choices=ids, value=ids[0] if ids else None),
                self.page.compare_runs: gr.update(choices=ids, value=ids[:1])}

    def on_watch(self, monitor_state, run_id):

        if not run_id:
            raise TunewiseError("run: pick a run in the list first", field="run")
        self.run_dir(monitor_state, run_id)
        return self.watch(monitor_state, run_id)

    def on_overlay(self, run_ids, metric, monitor_state):

        if not isinstance(metric, str) or not metric.strip():
            raise TunewiseError(f"metric: pick a metric to compare (loss, eval_loss, reward, ...), not {metric!r}",
                                field="metric")
        if run_ids is not None and not isinstance(run_ids, list):
            raise TunewiseError("run: pick the runs to compare from the list", field="run")
        compared = {run_id: events_so_far(self.run_dir(monitor_state, run_id) / EVENTS_FILE) for run_id in run_ids or []}
        return {self.page.overlay_plot: figures.overlay_figure(compared, metric=metric)}

    def on_generate(self, run_id, prompts, monitor_state):

        if not run_id:
            raise TunewiseError("run: pick a finished run in the list first", field="run")
        run_dir = self.run_dir(monitor_state, run_id)
        lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
        rows = samples.generate(run_dir, lines, self.config.generate_timeout_s)
        return {self.page.samples_table: rows}

    def on_export(self, run_id, reload_16bit, monitor_state):

        if not run_id:
            raise TunewiseError("run: pick a finished run in the list first", field="run")
        archive, note = runs.export(self.run_dir(monitor_state, run_id), self.config.exports_dir, bool(reload_16bit),
                                    self.config.generate_timeout_s)
        return {self.page.export_note: self.shown(note), self.page.export_file: archive}


# -- wiring: every event, each with an api_name -------------------------------------------------------------


def _wire(page: Page, h: Handlers) -> None:

    p = page
    ev = functools.partial(shows_errors_in_page, shown=h.shown)  # every handler's errors reach the page as messages
    nav = dict(show_progress="hidden")

    def step(number: int):
        return lambda: gr.Walkthrough(selected=number)

    p.next_1.click(step(2), outputs=p.walkthrough, api_name="go_data", **nav)
    p.back_2.click(step(1), outputs=p.walkthrough, api_name="go_model", **nav)
    p.back_3.click(step(2), outputs=p.walkthrough, api_name="back_to_data", **nav)
    p.history_1.click(step(5), outputs=p.walkthrough, api_name="go_history", **nav).then(
        ev(h.on_runs), inputs=p.monitor_state, outputs=p.history_outputs, api_name="runs_after_history")
    p.to_results.click(step(5), outputs=p.walkthrough, api_name="go_results", **nav).then(
        ev(h.on_runs), inputs=p.monitor_state, outputs=p.history_outputs, api_name="runs_after_nav")

    # Steps 1-3: the model card, the upload and the dataset profile, the advice, the plan's memory.
    profile_io = dict(inputs=[p.plan_state, p.dataset, p.model], outputs=[p.plan_state, p.profile_table, p.histogram])
    advice_io = dict(inputs=[p.plan_state], inputs_kwargs={**p.plan_widgets, **p.advisor_widgets},
                     outputs=p.recommend_outputs)
    estimate_io = dict(inputs=[p.plan_state], inputs_kwargs=p.plan_widgets, outputs=p.plan_outputs)
    p.model.change(ev(h.on_model), inputs=p.model, outputs=p.model_card, api_name="model_info")
    p.upload.upload(ev(h.on_upload), inputs=[p.plan_state, p.upload], outputs=[p.dataset, p.plan_state], api_name="upload")
    p.dataset.change(ev(h.on_profile), **profile_io, api_name="profile")
    p.next_2.click(step(3), outputs=p.walkthrough, api_name="go_plan", **nav).then(
        ev(h.on_recommend), **advice_io, api_name="recommend").then(
        ev(h.on_estimate), **estimate_io, api_name="estimate")
    p.readvise.click(ev(h.on_readvise), **advice_io, api_name="readvise").then(
        ev(h.on_estimate), **estimate_io, api_name="estimate_after_readvise")
    for name, widget in p.plan_widgets.items():
        if name in ("model", "dataset", "goal", "gpu", "num_gpus"):
            continue  # those change the advice: the plan step re-advises when you reach it
        widget.input(ev(h.on_estimate), **estimate_io, api_name=f"edit_{name}", show_progress="hidden",
                     trigger_mode="always_last")

    # Step 3's learning-rate check: launched like a run, polled by its own timer; its result fills in the rate.
    pilot_outputs = [p.pilot_state, p.pilot_status, p.pilot_loss_plot, p.pilot_rate_plot, p.pilot_timer]
    p.pilot_btn.click(ev(h.on_pilot), inputs=[p.pilot_state, p.monitor_state, p.plan_state], inputs_kwargs=p.plan_widgets,
                      outputs=[*pilot_outputs, p.monitor_state], api_name="pilot")
    p.pilot_timer.tick(ev(h.pilot_poll), inputs=[p.pilot_state, p.plan_state], inputs_kwargs=p.plan_widgets,
                       outputs=[*pilot_outputs, p.plan_state, p.learning_rate, p.recommendations, p.cli_text, p.yaml_text],
                       api_name="pilot_poll", show_progress="hidden", trigger_mode="always_last")
    p.pilot_stop_btn.click(ev(h.on_pilot_stop), inputs=p.pilot_state, outputs=p.pilot_timer, api_name="pilot_stop")

    # Step 4: launch, the live monitor, stop, resume, the log.
    monitor = dict(inputs=p.monitor_state, outputs=p.monitor_outputs)
    p.launch_btn.click(ev(h.on_launch), inputs=[p.monitor_state, p.plan_state], inputs_kwargs=p.plan_widgets,
                       outputs=[p.walkthrough, *p.monitor_outputs], api_name="launch")
    p.timer.tick(ev(h.poll), **monitor, api_name="poll", show_progress="hidden", trigger_mode="always_last")
    p.stop_btn.click(ev(h.on_stop), **monitor, api_name="stop")
    p.resume_btn.click(ev(h.on_resume), **monitor, api_name="resume")
    p.log_btn.click(ev(h.on_log_tail), inputs=p.monitor_state, outputs=p.log_tail, api_name="log_tail")

    # Step 5: the history, curves compared, samples, export.
    overlay_io = dict(inputs=[p.compare_runs, p.compare_metric, p.monitor_state], outputs=p.overlay_plot)
    p.refresh_btn.click(ev(h.on_runs), inputs=p.monitor_state, outputs=p.history_outputs, api_name="runs")
    p.watch_btn.click(ev(h.on_watch), inputs=[p.monitor_state, p.open_run], outputs=[p.walkthrough, *p.monitor_outputs],
                      api_name="watch")
    p.compare_runs.change(ev(h.on_overlay), **overlay_io, api_name="overlay")
    p.compare_metric.change(ev(h.on_overlay), **overlay_io, api_name="overlay_metric")
    p.generate_btn.click(ev(h.on_generate), inputs=[p.open_run, p.prompts, p.monitor_state], outputs=p.samples_table,
                         api_name="samples")
    p.export_btn.click(ev(h.on_export), inputs=[p.open_run, p.export_reload, p.monitor_state],
                       outputs=[p.export_note, p.export_file], api_name="export")

    # On page load, independently (one failing does not block the others): the model card; the dataset
    # profile, then the advice and the plan's memory; the run to watch and the history.
    p.blocks.load(ev(h.on_model), inputs=p.model, outputs=p.model_card, api_name="load_model_info")
    p.blocks.load(ev(h.on_profile), **profile_io, api_name="load_profile").then(
        ev(h.on_recommend), **advice_io, api_name="load_recommend").then(
        ev(h.on_estimate), **estimate_io, api_name="load_estimate")
    p.blocks.load(ev(h.on_attach), inputs=p.monitor_state, outputs=[p.walkthrough, *p.monitor_outputs],
                  api_name="attach").then(
        ev(h.on_runs), inputs=p.monitor_state, outputs=p.history_outputs, api_name="load_runs")


def build_app(config: AppConfig):
    """The Blocks app: the layout, its handlers, and the wiring between them."""
    page = _layout(config)
    with page.blocks:
        _wire(page, Handlers(config, page))
    return page.blocks


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
    args = parser.parse_args(argv)
    if args.auth is not None and (":" not in args.auth or not args.auth.split(":", 1)[0] or not args.auth.split(":", 1)[1]):
        parser.error("--auth must be USER:PASS with both parts non-empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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

    if config.warm_worker:

        threading.Thread(target=warm.start_when_serving, args=(runs_dir, host, args.port, os.getpid()), daemon=True).start()
    # Files: Gradio serves its own upload cache and the files handlers return (copied into that cache: the
    # export archive); nothing is added to allowed_paths, and the runs folder (plans, logs, uploaded data,
    # checkpoints) is blocked outright, wherever it lies. show_error=True: a refusal by Gradio's own input
    # checks reaches the page as its message (never a traceback; handler errors are shows_errors_in_page messages).
    app.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=args.port, auth=auth, css=css, theme=gr.themes.Soft(primary_hue="indigo"),
        max_file_size="20mb" if demo_mode else None, blocked_paths=[str(runs_dir)], footer_links=["api", "gradio"],
        show_error=True, app_kwargs={"middleware": [Middleware(RequireLogin)]},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
