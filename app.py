"""Tunewise in the browser: a five-step wizard from "which model?" to a tuned, exported adapter.

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--demo-mode] [--runs-dir runs]

Layout and event wiring only (see ../shared/style.md): the decisions live in
`advisor` (plans, memory, advice, dataset profiles, `advisor.wizard` for the
widgets-to-plan mapping, table rows and the demo's rules), the charts and the
monitor's text in `figures`, and everything that touches the runs folder in
`trainer` (`trainer.supervisor` launches, stops and resumes runs in their own
processes, `trainer.runs` keeps uploads and exports, `trainer.samples` and
`trainer.chat` generate and `trainer.preview` renders the data's loss tokens,
each in a subprocess). The page talks to a run only through its
directory: it launches it, then tails `events.jsonl` from a byte offset kept
per browser session, so closing the browser or restarting this app never
stops a run. torch, transformers and TRL are never imported here.

The file reads top to bottom: `_layout` (one function per wizard step),
`_wire` (every event with an `api_name`, so the whole wizard can be driven
with `gradio_client`, as tests/test_app_api.py does), and `main`. What each
event does is `handlers.Handlers` (one method per event, each returning
{component: value}), with the server's `AppConfig` and the error shaping.

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
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from starlette.middleware import Middleware

import figures
from advisor import wizard
from handlers import AppConfig, Handlers, new_monitor_state, new_plan_state, shows_errors_in_page
from trainer import warm
from ui_parts import RequireLogin, number_with_named_range, patient_url_ok, setting_widget

__all__ = ["AppConfig", "build_app", "main", "parse_args"]

REPO_ROOT = Path(__file__).resolve().parent
CSS_PATH = REPO_ROOT / "assets" / "ui.css"
CONNECTION_JS = REPO_ROOT / "assets" / "connection.js"  # the banner when the server stops answering
LOG = logging.getLogger("tunewise.app")


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
    def moves(self) -> list:
        """What moving to another step changes: the walkthrough and the step bar above it (Handlers.go)."""
        return [self.walkthrough, *self.step_bar]

    @property
    def plan_outputs(self) -> list:
        return self.group("memory_table", "memory_plot", "fit_table", "recommendations", "plan_status",
                          "explanations", "cli_text", "yaml_text", "pilot_cost")

    @property
    def saved_widgets(self) -> dict:
        """What a reload keeps (wizard.SAVED_WIDGETS), by name."""
        return {name: getattr(self, name) for name in wizard.SAVED_WIDGETS}

    @property
    def recommend_outputs(self) -> list:
        return [self.plan_state, *self.advised_widgets.values(), self.guide_table, self.guide_note, self.advice_notes]

    @property
    def monitor_outputs(self) -> list:
        return [self.monitor_state, *self.group("run_header", "loss_plot", "forgetting_plot", "reward_time_plot",
                                                "reward_kl_plot", "alerts", "timer", "reward_row", "comparison",
                                                "log_tail", "memory_run_plot")]

    @property
    def history_outputs(self) -> list:
        return self.group("runs_table", "open_run", "compare_runs")

    @property
    def history_inputs(self) -> list:
        """The monitor state and the history's filters (tag, stage, state), which every history refresh reads."""
        return self.group("monitor_state", "filter_tag", "filter_stage", "filter_state")


def _step_model(gr, Number, wizard) -> dict:  # noqa: N803 (Number stands for gr.Number)
    local_gpu, local_count = wizard.default_hardware()  # this machine's GPUs, when it has any
    with gr.Step("Model & hardware", id=1, elem_id="step-model"):
        with gr.Row():
            with gr.Column(scale=3):
                model = gr.Dropdown(
                    choices=wizard.model_choices(), value="demo", label="Model", allow_custom_value=True,
                    filterable=True, elem_id="model",
                    info="Search the catalogue, or type a hub id (owner/name), a local folder, or a size like 7B.")
                with gr.Row():
                    gpu = gr.Dropdown(choices=wizard.gpu_choices(), value=local_gpu, label="GPU", elem_id="gpu",
                                      info="What you will train on (this machine's, to start with); the plan is "
                                           "sized for it.")
                    num_gpus = Number("num_gpus", value=local_count, precision=0, label="Number of GPUs", elem_id="num_gpus",
                                      info="per node when Nodes is above 1")
                    num_nodes = Number("num_nodes", value=1, precision=0, label="Nodes", elem_id="num_nodes",
                                       info="machines; above 1: export a cluster job")
            with gr.Column(scale=4):
                model_card = gr.Markdown(elem_id="model-card")
        with gr.Row():
            next_1 = gr.Button("Next: data & goal", variant="primary", elem_id="next-1", scale=0, min_width=200)
            history_1 = gr.Button("Run history", elem_id="open-history", scale=0, min_width=140)
    return dict(model=model, gpu=gpu, num_gpus=num_gpus, num_nodes=num_nodes, model_card=model_card, next_1=next_1,
                history_1=history_1)


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
        loss_preview = _loss_preview(gr)
        with gr.Row():
            back_2 = gr.Button("Back", elem_id="back-2", scale=0, min_width=100)
            next_2 = gr.Button("Next: plan and advice", variant="primary", elem_id="next-2", scale=0, min_width=220)
    return dict(dataset=dataset, upload=upload, goal=goal, task=task, domain=domain, priority=priority,
                quantized_inference=quantized_inference, profile_table=profile_table, histogram=histogram,
                back_2=back_2, next_2=next_2, **loss_preview)


def _loss_preview(gr) -> dict:
    """Step 2's "what the model trains on": rows through the chat template, the loss tokens highlighted."""
    w = {}
    with gr.Accordion("What the model will be trained on: rows through its chat template, loss tokens highlighted",
                      open=False, elem_id="loss-preview"):
        with gr.Row():
            w["preview_rows"] = gr.Slider(1, 8, value=3, step=1, label="Rows to show", scale=1, elem_id="preview-rows")
            w["preview_btn"] = gr.Button("Show the rows as the trainer sees them", scale=0, min_width=280,
                                         elem_id="preview-btn")
        w["preview_note"] = gr.Markdown(elem_id="preview-note")
        w["preview_html"] = gr.HTML(elem_id="preview-html")
    return w


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
        w["max_steps"] = Number("max_steps", value=0, precision=0, label="Max steps (0: run the epochs)",
                                elem_id="max-steps")
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
    w["readvise"] = gr.Button("Re-advise, keeping my changes", size="sm", elem_id="readvise")
    return w


def _pilot_panel(gr, figures) -> dict:
    """The learning-rate pilot in the plan step: its expected cost before the click, then its live charts."""
    w = {"pilot_state": gr.State(dict)}  # this browser's pilot: run id, events read so far and their offset
    with gr.Accordion("Check the learning rate on my data", open=False, elem_id="pilot"):
        w["pilot_cost"] = gr.Markdown(elem_id="pilot-cost")
        with gr.Row():
            w["pilot_budget"] = gr.Textbox(label=wizard.PILOT_BUDGET_LABEL, placeholder="10% of the run", scale=0,
                                           min_width=200, elem_id="pilot-budget",
                                           info="empty: 10% of the planned run's training time, at least 1 minute")
            w["pilot_btn"] = gr.Button("Check the learning rate on my data", elem_id="pilot-btn", scale=0, min_width=280)
            w["pilot_stop_btn"] = gr.Button("Stop the check (keeps what it measured)", elem_id="pilot-stop", scale=0,
                                            min_width=260)
        w["pilot_status"] = gr.Markdown(elem_id="pilot-status")
        with gr.Row():
            w["pilot_loss_plot"] = gr.Plot(figures.pilot_loss_figure([]), show_label=False, elem_id="pilot-loss-plot")
            w["pilot_rate_plot"] = gr.Plot(figures.pilot_rate_figure([]), show_label=False, elem_id="pilot-rate-plot")
        w["pilot_timer"] = gr.Timer(1.0, active=False)
    return w


def _advanced_settings(gr, Number) -> dict:  # noqa: N803
    """A widget for every plan setting the steps do not show elsewhere, four to a row, by the plan's sections."""
    w = {}
    sections: dict[str, list] = {}
    for setting in wizard.ADVANCED_SETTINGS:
        sections.setdefault(setting.dotted.split(".")[0] if "." in setting.dotted else "run", []).append(setting)
    for section, members in sections.items():
        gr.Markdown(f"**{section.capitalize()}**")
        for start in range(0, len(members), 4):
            with gr.Row():
                for setting in members[start:start + 4]:
                    w[setting.name] = setting_widget(setting, Number)
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
                                            column_widths=["18%", "14%", "68%"], max_height=4000)
        w.update(_pilot_panel(gr, figures))
        with gr.Accordion("Edit the plan: every value updates memory and fit at once", open=True, elem_id="plan-editor"):
            w.update(_plan_editor(gr, Number))
        with gr.Row():
            with gr.Column(scale=3):
                w["guide_table"] = gr.Dataframe(interactive=False, wrap=True, elem_id="guide-table",
                                                label="The Fine-Tuning Techniques Guide's quick reference beside our estimate (GB)")
            with gr.Column(scale=2):
                w["guide_note"] = gr.Markdown(elem_id="guide-note")
        with gr.Accordion("Advanced settings: every other plan setting", open=False, elem_id="advanced"):
            w.update(_advanced_settings(gr, Number))
        with gr.Accordion("How each memory figure is computed", open=False):
            w["explanations"] = gr.Dataframe(headers=["component", "how"], interactive=False, wrap=True,
                                             column_widths=["20%", "80%"])
        w.update(_plans_in_and_out(gr))
        with gr.Accordion("Show as YAML / CLI", open=False, elem_id="show-yaml"):
            w["cli_text"] = gr.Code(language="shell", label="Run it from a terminal", elem_id="cli-text")
            w["yaml_text"] = gr.Code(language="yaml", label="plan.yaml", elem_id="yaml-text")
        with gr.Row():
            w["back_3"] = gr.Button("Back", elem_id="back-3", scale=0, min_width=100)
            w["launch_btn"] = gr.Button("Launch training", variant="primary", elem_id="launch", scale=0, min_width=200)
            w["job_scheduler"] = gr.Dropdown(choices=["slurm", "skypilot", "torchrun"], value="slurm", scale=0,
                                             min_width=140, label="Scheduler", elem_id="job-scheduler")
            w["export_job_btn"] = gr.Button("Export a cluster job", elem_id="export-job", scale=0, min_width=200)
        w["job_note"] = gr.Markdown(elem_id="job-note")
    return w


def _plans_in_and_out(gr) -> dict:
    """Step 3's plan files: load a plan.yaml into every widget, save the page's plan as one."""
    w = {}
    with gr.Accordion("Plans in and out: load a plan.yaml, save this one", open=False, elem_id="plan-io"):
        with gr.Row():
            w["plan_file"] = gr.File(label="Load a plan.yaml (fills every setting, Advanced ones too)",
                                     file_types=[".yaml", ".yml"], file_count="single", height=90, elem_id="plan-file",
                                     scale=2)
            with gr.Column(scale=1):
                w["save_plan_btn"] = gr.Button("Save plan", elem_id="save-plan")
                w["plan_download"] = gr.File(label="plan.yaml", interactive=False, height=90, elem_id="plan-download")
        w["plan_io_note"] = gr.Markdown(elem_id="plan-io-note")
    return w


def _step_monitor(gr, figures, poll_seconds: float) -> dict:
    with gr.Step("Launch & monitor", id=4, elem_id="step-monitor"):
        w = {"run_header": gr.HTML(figures.run_header_html(None, None), elem_id="run-header"),
             # The banner: alerts as they happen and what the trainer adjusted, above the charts.
             "alerts": gr.Markdown(figures.alerts_markdown([]), label="Alerts", elem_id="alerts",
                                   elem_classes=["tw-alerts"])}
        with gr.Row():
            w["stop_btn"] = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="stop", scale=0, min_width=220)
            w["resume_btn"] = gr.Button("Resume from the last checkpoint", elem_id="resume", scale=0, min_width=260)
            w["log_btn"] = gr.Button("Show the log tail", elem_id="show-log", scale=0, min_width=170)
            w["to_results"] = gr.Button("Results & runs", elem_id="next-4", scale=0, min_width=150)
        with gr.Row():
            w["loss_plot"] = gr.Plot(figures.loss_figure([]), label="Loss", show_label=False, elem_id="loss-plot")
            w["forgetting_plot"] = gr.Plot(figures.forgetting_figure([]), label="Forgetting", show_label=False,
                                           elem_id="forgetting-plot")
        # The measured peak of every log against the plan's estimate (GPU tensors; host RAM on the CPU).
        w["memory_run_plot"] = gr.Plot(figures.memory_run_figure([]), label="Memory: measured against the estimate",
                                       show_label=False, elem_id="memory-run-plot")
        # Shown once the run logs a reward or a KL (preference stages).
        with gr.Row(visible=False, elem_id="reward-row") as reward_row:
            w["reward_time_plot"] = gr.Plot(figures.reward_kl_time_figure([]), label="Reward and KL", show_label=False,
                                            elem_id="reward-time-plot")
            w["reward_kl_plot"] = gr.Plot(figures.reward_vs_kl_figure([]), label="Reward against KL", show_label=False,
                                          elem_id="reward-kl-plot")
        w["reward_row"] = reward_row
        w["comparison"] = gr.Dataframe(visible=False, interactive=False, wrap=True, elem_id="comparison",
                                       label="RLHF beside DPO, on the same held-out prompts and reward model")
        w["log_tail"] = gr.Code(language=None, label="stdout.log (last lines)", visible=False, elem_id="log-tail")
        w["timer"] = gr.Timer(poll_seconds, active=False)
    return w


def _step_results(gr, wizard, demo_mode: bool) -> dict:
    with gr.Step("Results & runs", id=5, elem_id="step-results"):
        w = {}
        with gr.Row(equal_height=True):
            w["refresh_btn"] = gr.Button("Refresh the history", scale=0, min_width=180, elem_id="refresh-runs")
            # Runs started elsewhere (`tunewise train` from a shell, a cluster job) live in their own runs folder.
            w["other_runs_dir"] = gr.Textbox(label="Also show the runs in this folder (e.g. where tunewise train ran: "
                                             "its ./runs)", placeholder="/path/to/runs", scale=3, visible=not demo_mode,
                                             elem_id="other-runs-dir")
            w["other_runs_btn"] = gr.Button("Show its runs", scale=0, min_width=150, visible=not demo_mode,
                                            elem_id="other-runs-btn")
        with gr.Row(equal_height=True):
            w["filter_tag"] = gr.Dropdown(choices=[wizard.ALL], value=wizard.ALL, label="Tag", scale=1,
                                          allow_custom_value=True, elem_id="filter-tag")
            w["filter_stage"] = gr.Dropdown(choices=list(wizard.STAGE_FILTERS), value=wizard.ALL, label="Stage",
                                            scale=1, elem_id="filter-stage")
            w["filter_state"] = gr.Dropdown(choices=list(wizard.STATE_FILTERS), value=wizard.ALL, label="State",
                                            scale=1, elem_id="filter-state")
        w["runs_table"] = gr.Dataframe(headers=wizard.RUN_HEADERS, interactive=False, wrap=True, label="Run history",
                                       elem_id="runs-table")
        with gr.Row():
            w["open_run"] = gr.Dropdown(choices=[], label="Run", elem_id="open-run", scale=2)
            w["open_step"] = gr.Dropdown(choices=[], label="Pipeline step (samples and export use its model)",
                                         visible=False, elem_id="open-step", scale=1)
            w["watch_btn"] = gr.Button("Watch in step 4", scale=0, min_width=170, elem_id="watch")
            w["load_run_plan_btn"] = gr.Button("Edit its plan in step 3", scale=0, min_width=190,
                                               elem_id="load-run-plan")
            w["delete_btn"] = gr.Button("Delete this run", variant="secondary", scale=0, min_width=150,
                                        elem_id="delete-run")
            w["delete_confirm"] = gr.Button("Yes, delete it", variant="stop", visible=False, scale=0, min_width=150,
                                            elem_id="delete-confirm")
        with gr.Row():
            w["rename_box"] = gr.Textbox(label="Name", placeholder="a name for the picked run", scale=2,
                                         elem_id="rename-box")
            w["rename_btn"] = gr.Button("Rename", scale=0, min_width=110, elem_id="rename-run")
            w["tag_box"] = gr.Textbox(label="Tag", placeholder="one word, e.g. baseline", scale=1, elem_id="tag-box")
            w["tag_btn"] = gr.Button("Add tag", scale=0, min_width=110, elem_id="tag-run")
            w["untag_btn"] = gr.Button("Remove tag", scale=0, min_width=120, elem_id="untag-run")
        w["run_note"] = gr.Markdown(elem_id="run-note")
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
            w["samples_table"] = gr.Dataframe(headers=["prompt", "base", "tuned"], interactive=False, wrap=True,
                                              column_widths=["30%", "35%", "35%"], elem_id="samples-table")
        with gr.Accordion("Merge / export", open=False, elem_id="export"):
            w["export_reload"] = gr.Checkbox(value=False, label="QLoRA run: merge into the base reloaded in 16 bit "
                                             "(the adapter was trained against 4-bit weights)", visible=False)
            with gr.Row():
                w["export_btn"] = gr.Button("Merge the adapter into the base and export", elem_id="export-btn")
                w["adapter_btn"] = gr.Button("Download the adapter alone (small)", elem_id="adapter-btn")
            w["export_note"] = gr.Markdown()
            w["export_file"] = gr.File(label="Download", interactive=False)
        w.update(_chat_tab(gr))
    return w


def _chat_tab(gr) -> dict:
    """Step 5's chat: talk to the run picked above (its pipeline step) through the template it trained with."""
    from trainer.chat import MAX_NEW_TOKENS_CAP

    w = {}
    with gr.Tabs(elem_id="results-tabs"):
        with gr.Tab("Chat with the tuned model", id="chat", elem_id="chat-tab"):
            with gr.Row():
                w["chat_system"] = gr.Textbox(label="System prompt", lines=1, scale=3, elem_id="chat-system",
                                              placeholder="optional: how the model should answer")
                w["chat_temperature"] = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)",
                                                  scale=1, elem_id="chat-temperature")
                w["chat_top_p"] = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p", scale=1)
                w["chat_max_new_tokens"] = gr.Slider(1, MAX_NEW_TOKENS_CAP, value=48, step=1, label="Max new tokens",
                                                     scale=1, elem_id="chat-max-new-tokens")
                w["chat_compare"] = gr.Checkbox(value=False, label="Compare with base", scale=0, min_width=160,
                                                elem_id="chat-compare")
            with gr.Row():
                w["chat_tuned"] = gr.Chatbot(label="Tuned model", height=320, elem_id="chat-tuned")
                w["chat_base"] = gr.Chatbot(label="Base model", height=320, visible=False, elem_id="chat-base")
            with gr.Row():
                w["chat_message"] = gr.Textbox(show_label=False, placeholder="Write a message and press Enter",
                                               scale=6, elem_id="chat-message")
                w["chat_send"] = gr.Button("Send", variant="primary", scale=0, min_width=100, elem_id="chat-send")
                w["chat_clear"] = gr.Button("Clear", scale=0, min_width=90, elem_id="chat-clear")
            w["chat_note"] = gr.Markdown(elem_id="chat-note")
    return w


def _layout(config: AppConfig) -> Page:
    """The page: a header, the demo banner, and the five steps of the walkthrough."""


    Number = number_with_named_range()  # noqa: N806 (stands for gr.Number)
    with gr.Blocks(title="Tunewise: plan, advise and run fine-tuning") as blocks:
        plan_state = gr.State(new_plan_state)  # this browser's plan step: dataset profile, last advice, uploads
        monitor_state = gr.State(new_monitor_state)  # this browser's monitor: the run watched, its events
        # What a reload keeps: the wizard's values and step (and, signed, the demo's own runs); see Handlers.on_restore
        saved = gr.BrowserState({}, storage_key="tunewise-wizard")
        gr.HTML("<div class='tw-header'><div class='tw-logo'>Tunewise</div>"
                "<div class='tw-tagline'>Plan the memory, get the settings with their reasons, train in the background "
                "and watch loss, reward vs KL and forgetting live.</div></div>")
        start_over = gr.Button("Start over", size="sm", variant="secondary", elem_id="start-over",
                               elem_classes=["tw-start-over"])
        if config.demo_mode:
            gr.HTML(f"<div class='tw-demo'>Public demo: training is limited to the bundled demo model, "
                    f"{config.demo_max_steps} steps, one run at a time. Planning works for any model.</div>")
        # The step bar: Gradio's own stepper opens only the steps before the current one; this one opens every
        # step reached so far (and the history), and a jump forward runs Next's checks (Handlers.step_bar_to).
        with gr.Row(elem_id="tw-steps", elem_classes=["tw-steps"]):
            step_bar = [gr.Button(wizard.step_bar_label(number), elem_id=f"step-bar-{number}", size="sm",
                                  variant="primary" if number == 1 else "secondary",
                                  interactive=number in wizard.open_steps(1, 1), elem_classes=["tw-step"])
                        for number in wizard.STEPS]
        step_at = gr.Number(value=1, visible=False, elem_id="step-at")  # the step on screen, as a jump reads it
        with gr.Walkthrough(selected=1, elem_id="wizard") as walkthrough:
            widgets = {**_step_model(gr, Number, wizard), **_step_data(gr, wizard), **_step_plan(gr, Number),
                       **_step_monitor(gr, figures, config.poll_seconds), **_step_results(gr, wizard, config.demo_mode)}
    page = Page(blocks=blocks, walkthrough=walkthrough, plan_state=plan_state, monitor_state=monitor_state, saved=saved,
                start_over=start_over, step_bar=step_bar, step_at=step_at,
                **widgets)
    assert set(wizard.PLAN_WIDGETS) <= set(widgets), "every plan widget is on the page"
    return page


# -- wiring: every event, each with an api_name -------------------------------------------------------------


def _wire(page: Page, h: Handlers) -> None:

    p = page
    ev = functools.partial(shows_errors_in_page, shown=h.shown)  # every handler's errors reach the page as messages

    def step(number: int):
        return lambda: h.go(number)

    # Moving to another step starts at its top (the page would otherwise stay scrolled where the button was).
    top = "window.scrollTo({top: 0, behavior: 'smooth'})"
    nav_0 = dict(show_progress="hidden", js=f"() => {{ {top}; }}")
    nav_1 = dict(show_progress="hidden", js=f"(x) => {{ {top}; return x; }}")
    nav_n = dict(show_progress="hidden", js=f"(...args) => {{ {top}; return args; }}")

    # After each event that moves the page or edits the plan, the browser keeps the wizard (a reload finds it).
    # One at a time, in the order they were asked for: the newest state is the one the browser keeps.
    remember_io = dict(inputs=[p.plan_state, p.monitor_state, p.saved], inputs_kwargs=p.saved_widgets,
                       outputs=p.saved, show_progress="hidden", concurrency_limit=1, concurrency_id="remember")

    def remember(dependency, at: int, after: str):
        # Private but for the launch's (which tests drive): each has every widget as an input, and the API's
        # description (/gradio_api/info, read by every client) would otherwise grow by megabytes.
        visibility = "public" if after == "launch" else "private"
        dependency.success(ev(h.remember_at(at)), **remember_io, api_name=f"remember_after_{after}",
                           api_visibility=visibility)
        return dependency

    remember(p.next_1.click(ev(h.on_next_model), inputs=p.model, outputs=p.moves, api_name="go_data", **nav_1), 2, "go_data")
    remember(p.back_2.click(step(1), outputs=p.moves, api_name="go_model", **nav_0), 1, "go_model")
    remember(p.back_3.click(step(2), outputs=p.moves, api_name="back_to_data", **nav_0), 2, "back_to_data")
    remember(p.history_1.click(step(5), outputs=p.moves, api_name="go_history", **nav_0), 5, "go_history").then(
        ev(h.on_runs), inputs=p.history_inputs, outputs=p.history_outputs, api_name="runs_after_history")
    remember(p.to_results.click(step(5), outputs=p.moves, api_name="go_results", **nav_0), 5, "go_results").then(
        ev(h.on_runs), inputs=p.history_inputs, outputs=p.history_outputs, api_name="runs_after_nav")

    # The step bar: any step reached so far, in one click. The page says which step is on screen (the jump's
    # `at`); going forward runs Next's checks and, past step 2, the advice and the plan's memory, as Next does.
    on_screen = ("(...args) => { const ids = ['step-model', 'step-data', 'step-plan', 'step-monitor', 'step-results'];"
                 " const shown = ids.findIndex((id) => { const el = document.getElementById(id);"
                 " return el !== null && el.offsetParent !== null; });"
                 f" args[0] = shown + 1 || 1; {top}; return args; }}")
    for number, button in zip(wizard.STEPS, p.step_bar):
        jumped = button.click(ev(h.step_bar_to(number)), inputs=[p.step_at, p.plan_state, p.dataset, p.model],
                              outputs=[*p.moves, p.step_at, p.plan_state, p.profile_table, p.histogram],
                              api_name=f"step_{number}", js=on_screen, show_progress="hidden")
        on_the_way = dict(api_visibility="private", show_progress="hidden")
        advised = jumped.success(ev(h.past_the_data_step(number, "advise")), inputs=[p.step_at, p.plan_state],
                                 inputs_kwargs={**p.plan_widgets, **p.advisor_widgets}, outputs=p.recommend_outputs,
                                 api_name=f"advise_after_step_{number}", **on_the_way).success(
            ev(h.past_the_data_step(number, "estimate")), inputs=[p.step_at, p.plan_state], inputs_kwargs=p.plan_widgets,
            outputs=p.plan_outputs, api_name=f"estimate_after_step_{number}", **on_the_way)
        remember(advised, number, f"step_{number}")
        if number == wizard.ALWAYS_OPEN_STEP:
            jumped.success(ev(h.on_runs), inputs=p.history_inputs, outputs=p.history_outputs,
                           api_name="runs_after_step_bar")

    # Steps 1-3: the model card, the upload and the dataset profile, the advice, the plan's memory.
    profile_io = dict(inputs=[p.plan_state, p.dataset, p.model], outputs=[p.plan_state, p.profile_table, p.histogram])
    advice_io = dict(inputs=[p.plan_state], inputs_kwargs={**p.plan_widgets, **p.advisor_widgets},
                     outputs=p.recommend_outputs)
    estimate_io = dict(inputs=[p.plan_state], inputs_kwargs=p.plan_widgets, outputs=p.plan_outputs)
    quiet = dict(api_visibility="private", show_progress="hidden")
    p.model.change(ev(h.on_model), inputs=p.model, outputs=p.model_card, api_name="model_info").failure(
        ev(h.model_problem), inputs=p.model, outputs=p.model_card, **quiet)
    p.upload.upload(ev(h.on_upload), inputs=[p.plan_state, p.upload], outputs=[p.dataset, p.plan_state], api_name="upload")
    p.dataset.change(ev(h.on_profile), **profile_io, api_name="profile").failure(ev(h.profile_problem), **profile_io,
                                                                                 **quiet)
    p.next_2.click(ev(h.on_next_data), inputs=[p.plan_state, p.dataset, p.model],
                   outputs=[*p.moves, p.plan_state, p.profile_table, p.histogram], api_name="go_plan", **nav_n).success(
        ev(h.on_recommend), **advice_io, api_name="recommend").success(
        ev(h.on_estimate), **estimate_io, api_name="estimate").success(
        ev(h.remember_at(3)), **remember_io, api_name="remember_plan")
    remember(p.readvise.click(ev(h.on_readvise), **advice_io, api_name="readvise").then(
        ev(h.on_estimate), **estimate_io, api_name="estimate_after_readvise"), 3, "readvise")
    for name, widget in p.plan_widgets.items():
        if name in ("model", "dataset", "goal", "gpu", "num_gpus", "num_nodes"):
            continue  # those change the advice: the plan step re-advises when you reach it
        if name in wizard.FOLLOWED_WIDGETS:  # others follow it (alpha the rank, the rate the method): re-advise
            edited = widget.input(ev(h.on_readvise), **advice_io, api_name=f"edit_{name}", show_progress="hidden",
                                  trigger_mode="always_last")
            edited.failure(ev(h.plan_problem), **estimate_io, **quiet)
            remember(edited.success(ev(h.on_estimate), **estimate_io, api_name=f"estimate_after_{name}",
                                    show_progress="hidden", api_visibility="private"), 3, f"edit_{name}")
            continue
        # (/estimate is the API for these: the same handler; each listed would add a copy of every plan widget)
        edited = widget.input(ev(h.on_estimate), **estimate_io, api_name=f"edit_{name}", show_progress="hidden",
                              trigger_mode="always_last", api_visibility="private")
        edited.failure(ev(h.plan_problem), **estimate_io, **quiet)
        remember(edited, 3, f"edit_{name}")  # (every plan widget is in step 3)

    # Step 3's learning-rate check: launched like a run, polled by its own timer; its result fills in the rate.
    pilot_outputs = [p.pilot_state, p.pilot_status, p.pilot_loss_plot, p.pilot_rate_plot, p.pilot_timer]
    p.pilot_btn.click(ev(h.on_pilot), inputs=[p.pilot_state, p.monitor_state, p.plan_state, p.pilot_budget],
                      inputs_kwargs=p.plan_widgets, outputs=[*pilot_outputs, p.monitor_state], api_name="pilot")
    p.pilot_budget.input(ev(h.on_pilot_budget), inputs=[p.plan_state, p.pilot_budget], inputs_kwargs=p.plan_widgets,
                         outputs=[p.plan_state, p.pilot_cost], api_name="pilot_budget", show_progress="hidden",
                         trigger_mode="always_last")
    p.pilot_timer.tick(ev(h.pilot_poll), inputs=[p.pilot_state, p.plan_state], inputs_kwargs=p.plan_widgets,
                       outputs=[*pilot_outputs, p.plan_state, p.learning_rate, p.recommendations, p.plan_status, p.cli_text,
                                p.yaml_text],
                       api_name="pilot_poll", show_progress="hidden", trigger_mode="always_last")
    p.pilot_stop_btn.click(ev(h.on_pilot_stop), inputs=p.pilot_state, outputs=p.pilot_timer, api_name="pilot_stop")

    # Step 4: launch, the live monitor, stop, resume, the log.
    monitor = dict(inputs=p.monitor_state, outputs=p.monitor_outputs)
    remember(p.launch_btn.click(ev(h.on_launch), inputs=[p.monitor_state, p.plan_state], inputs_kwargs=p.plan_widgets,
                                outputs=[*p.moves, *p.monitor_outputs], api_name="launch"), 4, "launch")
    p.export_job_btn.click(ev(h.on_export_job), inputs=[p.job_scheduler], inputs_kwargs=p.plan_widgets,
                           outputs=p.job_note, api_name="export_job")
    p.timer.tick(ev(h.poll), **monitor, api_name="poll", show_progress="hidden", trigger_mode="always_last")
    p.stop_btn.click(ev(h.on_stop), **monitor, api_name="stop")
    p.resume_btn.click(ev(h.on_resume), **monitor, api_name="resume")
    p.log_btn.click(ev(h.on_log_tail), inputs=p.monitor_state, outputs=[p.log_tail, p.monitor_state], api_name="log_tail")

    # Step 5: the history, curves compared, samples, export.
    overlay_io = dict(inputs=[p.compare_runs, p.compare_metric, p.monitor_state], outputs=p.overlay_plot)
    p.refresh_btn.click(ev(h.on_runs), inputs=p.history_inputs, outputs=p.history_outputs, api_name="runs")
    remember(p.watch_btn.click(ev(h.on_watch), inputs=[p.monitor_state, p.open_run],
                               outputs=[*p.moves, *p.monitor_outputs], api_name="watch"), 4, "watch")
    p.compare_runs.change(ev(h.on_overlay), **overlay_io, api_name="overlay")
    p.compare_metric.change(ev(h.on_overlay), **overlay_io, api_name="overlay_metric")
    p.open_run.change(ev(h.on_pick_run), inputs=[p.open_run, p.monitor_state],
                      outputs=p.group("open_step", "export_reload", "delete_confirm", "run_note"), api_name="pick_run")
    p.delete_btn.click(ev(h.on_delete), inputs=[p.open_run, p.monitor_state], outputs=[p.delete_confirm, p.run_note],
                       api_name="delete")
    p.delete_confirm.click(ev(h.on_delete_confirm), inputs=[p.open_run, p.monitor_state],
                           outputs=[*p.history_outputs, p.monitor_state, p.delete_confirm, p.run_note],
                           api_name="delete_confirm")
    runs_folder = dict(inputs=[p.other_runs_dir, p.monitor_state], outputs=[p.monitor_state, *p.history_outputs])
    p.other_runs_btn.click(ev(h.on_other_runs_dir), **runs_folder, api_name="other_runs_dir")
    p.other_runs_dir.submit(ev(h.on_other_runs_dir), **runs_folder, api_name="other_runs_dir_submit")
    p.generate_btn.click(ev(h.on_generate), inputs=[p.open_run, p.prompts, p.monitor_state, p.open_step],
                         outputs=p.samples_table, api_name="samples")
    p.export_btn.click(ev(h.on_export), inputs=[p.open_run, p.export_reload, p.monitor_state, p.open_step],
                       outputs=[p.export_note, p.export_file], api_name="export")
    p.adapter_btn.click(ev(h.on_adapter_download), inputs=[p.open_run, p.monitor_state, p.open_step],
                        outputs=[p.export_note, p.export_file], api_name="download_adapter")
    # Run management: rename and tag the picked run; the history filters by tag, stage and state.
    relabelled = [*p.history_outputs, p.run_note]
    p.rename_btn.click(ev(h.on_rename), inputs=[p.open_run, p.rename_box, *p.history_inputs], outputs=relabelled,
                       api_name="rename_run")
    p.tag_btn.click(ev(h.on_tag), inputs=[p.open_run, p.tag_box, *p.history_inputs], outputs=relabelled,
                    api_name="tag_run")
    p.untag_btn.click(ev(h.on_untag), inputs=[p.open_run, p.tag_box, *p.history_inputs], outputs=relabelled,
                      api_name="untag_run")
    for name in ("filter_tag", "filter_stage", "filter_state"):
        getattr(p, name).input(ev(h.on_runs), inputs=p.history_inputs, outputs=p.history_outputs,
                               api_name=f"runs_by_{name.split('_')[1]}")
    p.runs_table.change(ev(h.on_tag_choices), inputs=p.monitor_state, outputs=p.filter_tag,
                        api_name="tag_choices", show_progress="hidden")

    # Step 2's loss preview: the plan on the page (its sequence length, packing, format), rendered by TRL in a
    # subprocess (trainer.preview).
    p.preview_btn.click(ev(h.on_preview), inputs=[p.plan_state, p.preview_rows], inputs_kwargs=p.plan_widgets,
                        outputs=p.group("preview_note", "preview_html"), api_name="preview")

    # Plans in and out: a plan.yaml or a run's plan fills every widget, then the plan's memory is redrawn.
    loaded_io = [p.plan_state, *p.plan_widgets.values(), p.plan_io_note]
    remember(p.plan_file.upload(ev(h.on_load_plan_file), inputs=[p.plan_state, p.plan_file], outputs=loaded_io,
                                api_name="load_plan").success(ev(h.on_estimate), **estimate_io,
                                                              api_name="estimate_after_load"), 3, "load_plan")
    remember(p.load_run_plan_btn.click(ev(h.on_load_run_plan), inputs=[p.plan_state, p.open_run, p.monitor_state],
                                       outputs=[*loaded_io, *p.moves], api_name="load_run_plan").success(
        ev(h.on_estimate), **estimate_io, api_name="estimate_after_run_plan"), 3, "load_run_plan")
    p.save_plan_btn.click(ev(h.on_save_plan), inputs=[p.plan_state], inputs_kwargs=p.plan_widgets,
                          outputs=[p.plan_download, p.plan_io_note], api_name="save_plan")

    # Step 5's chat: the reply streams in (a generator handler), from a worker process per reply.
    chat_io = dict(inputs=[p.open_run, p.open_step, p.chat_message, p.chat_tuned, p.chat_base, p.chat_system,
                           p.chat_temperature, p.chat_top_p, p.chat_max_new_tokens, p.chat_compare, p.monitor_state],
                   outputs=p.group("chat_message", "chat_tuned", "chat_base", "chat_note"))
    p.chat_send.click(ev(h.on_chat), **chat_io, api_name="chat")
    p.chat_message.submit(ev(h.on_chat), **chat_io, api_name="chat_submit")
    p.chat_clear.click(ev(h.on_chat_clear), outputs=p.group("chat_tuned", "chat_base", "chat_note", "chat_message"),
                       api_name="chat_clear")

    # Start over: the browser forgets the wizard (not its runs), and the page reloads as on a first visit.
    p.start_over.click(ev(h.on_start_over), inputs=[p.plan_state, p.monitor_state], outputs=p.saved,
                       api_name="start_over", show_progress="hidden").then(
        None, js="() => { window.scrollTo(0, 0); window.location.reload(); }")

    # On page load: first the wizard as this browser left it (values, step; never an error), then, each on its
    # own (one failing does not block the others): the model card; the dataset profile, then the advice
    # (keeping the user's own changes) and the plan's memory; the run to watch and the history.
    restore = p.blocks.load(ev(h.on_restore), inputs=[p.saved, p.plan_state, p.monitor_state],
                            outputs=[*p.saved_widgets.values(), p.plan_state, p.monitor_state, *p.moves],
                            api_name="restore")
    restore.then(ev(h.on_model), inputs=p.model, outputs=p.model_card, api_name="load_model_info")
    restore.then(ev(h.on_profile), **profile_io, api_name="load_profile").then(
        ev(h.on_load_recommend), **advice_io, api_name="load_recommend").then(
        ev(h.on_estimate), **estimate_io, api_name="load_estimate")
    restore.then(ev(h.on_attach), inputs=p.monitor_state, outputs=[*p.moves, *p.monitor_outputs],
                 api_name="attach").then(
        ev(h.on_runs), inputs=p.history_inputs, outputs=p.history_outputs, api_name="load_runs")


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
    gr.networking.url_ok = patient_url_ok  # Gradio's own check gives the first render 3 s (see patient_url_ok)
    app.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=args.port, auth=auth, css=css, theme=gr.themes.Soft(primary_hue="indigo"),
        js=CONNECTION_JS.read_text(encoding="utf-8"),
        max_file_size="20mb" if demo_mode else None, blocked_paths=[str(runs_dir)], footer_links=["api", "gradio"],
        show_error=True, app_kwargs={"middleware": [Middleware(RequireLogin)]},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
