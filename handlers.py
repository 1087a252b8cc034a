"""The wizard's event handlers: what each event of the page does (app.py lays the page out and wires it).

`Handlers` has one method per event; each reads the widgets' values, asks `advisor` (plans, advice, the
demo's rules) or `trainer` (runs, uploads, samples, exports) and returns {component: value} for the outputs
it changes. Also here: the server's configuration (`AppConfig`), the error shaping every handler goes
through (a message in the page, never a traceback) and the two per-browser states. torch, transformers
and TRL are never imported here.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import os
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from gradio.utils import get_upload_folder

import figures
from advisor import gpus, wizard
from advisor.errors import TunewiseError, user_message
from advisor.plan import is_demo_model
from advisor.profile import profile_dataset
from trainer import chat, jobs, preview, runs, samples, supervisor, warm
from trainer.events import EVENTS_FILE
from trainer import rundir
from trainer.rundir import STDOUT_FILE, is_run_dir, run_path, tail_lines
from trainer.status import events_so_far

REPO_ROOT = Path(__file__).resolve().parent
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
    chat_timeout_s: float = 120.0
    """Longest one chat reply may take (loading the models included); the reply is cut off there."""
    demo_chat_max_new_tokens: int = 96
    """Longest chat reply (new tokens) in demo mode (otherwise trainer.chat.MAX_NEW_TOKENS_CAP)."""


# -- errors: a message in the page, never a traceback ------------------------------------------------------


def shows_errors_in_page(fn: Callable, shown: Callable[[str], str] | None = None) -> Callable:
    """Wrap an event handler so that any exception reaches the page as `gr.Error(message)`; `shown` edits
    each message first (the public demo cuts server paths out)."""
    shown = shown or (lambda text: text)
    if inspect.isgeneratorfunction(fn):
        return _streams_errors_in_page(fn, shown)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:  # (our own number boxes' messages are plain text too)
            exc.message = html.escape(shown(exc.message), quote=False)
            raise
        except Exception as exc:  # every handler: the page gets a message, the log gets the traceback
            if not isinstance(exc, TunewiseError):
                LOG.error("handler %s failed:\n%s", fn.__name__, traceback.format_exc())
            field_name = getattr(exc, "field", None)
            title = f"Check {field_name}" if field_name else ("Check your input" if isinstance(exc, TunewiseError) else "Error")
            raise gr.Error(html.escape(shown(user_message(exc)), quote=False), title=title, print_exception=False) from None

    return wrapper


_DONE = object()


def _streams_errors_in_page(fn: Callable, shown: Callable[[str], str]) -> Callable:
    """`shows_errors_in_page` for a handler that yields partial updates (a streamed chat reply): each step of
    the generator goes through the same error shaping, so an error after some updates is a message too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        updates = fn(*args, **kwargs)

        def next_update():
            return next(updates, _DONE)

        next_update.__name__ = fn.__name__
        step = shows_errors_in_page(next_update, shown)
        while (update := step()) is not _DONE:
            yield update

    return wrapper


#: What the pilot's messages call its budget on the page (the CLI's say --budget-minutes).
PILOT_BUDGET_NAME = f'"{wizard.PILOT_BUDGET_LABEL}"'


def _step_of(at) -> int:
    """The wizard step the page says it is on (a hidden number the page's script sets): 1 when unreadable."""
    return int(at) if isinstance(at, (int, float)) and 1 <= at <= len(wizard.STEPS) else 1


def problem_markdown(title: str, message: str) -> str:
    """A panel's text for a problem: what cannot be shown, and the message (plain text, every character kept)."""
    return f"#### {title}\n\n{html.escape(message, quote=False)}"


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






# -- handlers: one method per event; each returns {component: value} for the outputs it changes --------------


class Handlers:
    """What each event does. The rules live in advisor / trainer; a handler reads the widgets, calls them, and
    returns the components to update ({component: value}; outputs it leaves out keep their value).

    Two per-browser states reach the handlers: `plan_state` (new_plan_state) and `monitor_state`
    (new_monitor_state). In demo mode a visitor's uploads are named in the page by file name only
    (`plan_state["uploads"]` maps each name to the kept file, for this session alone), and a visitor sees
    and drives only the runs launched from this session (`monitor_state["own"]`)."""

    def __init__(self, config: AppConfig, page: Any):
        self.config, self.page = config, page
        self.demo_limits = wizard.DemoLimits(max_steps=config.demo_max_steps, keep_runs=config.demo_keep_runs)
        # The demo's one-run-at-a-time check and the launch must not interleave between requests (the queue
        # runs handlers concurrently): both happen under this lock.
        self.launch_lock = threading.Lock()
        self.uploaded_here = page.blocks.upload_file_set  # every file Gradio's upload route received
        self.secret = runs.session_secret(config.runs_dir)  # signs what a browser keeps across a reload

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

    def runs_dirs(self, monitor_state: dict) -> list[Path]:
        """The runs folders this page shows: the app's own, and the one the user opened in step 5 (say, where
        `tunewise train` runs from a shell land), never in the public demo."""
        other = monitor_state.get("other_runs_dir")
        return [self.config.runs_dir] + ([Path(other)] if other and not self.config.demo_mode else [])

    def runs_dir_of(self, monitor_state: dict, run_id: Any) -> Path:
        """The folder that holds `run_id`: the opened folder when the run is there, else the app's own."""
        for folder in self.runs_dirs(monitor_state)[1:]:
            if isinstance(run_id, str) and is_run_dir(run_path(folder, run_id)):
                return folder
        return self.config.runs_dir

    def run_dir(self, monitor_state: dict, run_id: Any) -> Path:
        """The directory of a run this visitor may open (TunewiseError naming the field otherwise)."""
        path = run_path(self.runs_dir_of(monitor_state, run_id), run_id)
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

    # The next three run when their event failed (.failure): the refusal stays readable in the panel it is
    # about (a toast fades, and the panel would keep the last good numbers under a bare "Error" badge).

    def model_problem(self, model):
        try:
            return self.on_model(model)
        except TunewiseError as exc:
            return {self.page.model_card: problem_markdown("This model cannot be planned", self.shown(str(exc)))}

    def profile_problem(self, plan_state, dataset, model):
        if (plan_state.get("profile") or {}).get("dataset_label") == wizard.dataset_label(dataset):
            return {}  # profiled: the table shows it
        try:
            return self.on_profile(plan_state, dataset, model)
        except TunewiseError as exc:
            return {self.page.plan_state: {**plan_state, "profile": None},
                    self.page.profile_table: [["problem", self.shown(str(exc))]],
                    self.page.histogram: figures.empty_figure("Token lengths", "No profile: the dataset could not be read.")}

    def plan_problem(self, plan_state, **values):
        p = self.page
        try:
            self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
            wizard.plan_view(wizard.plan_from_widgets(values))
            return {}
        except TunewiseError as exc:
            cleared = {"headers": ["-"], "data": []}
            return {p.plan_status: problem_markdown("This plan cannot be estimated", self.shown(str(exc))),
                    p.memory_table: cleared, p.fit_table: cleared, p.cli_text: "", p.yaml_text: "",
                    p.memory_plot: figures.empty_figure("Memory per GPU", "Fix the setting named above.")}

    def on_next_model(self, model):
        """Step 1 -> 2, only for a model the planner can read (the message says what to fix otherwise)."""
        self.demo_guard(model=model)
        wizard.model_summary(model)
        return self.go(2)

    def on_next_data(self, plan_state, dataset, model):
        """Step 2 -> 3, only for a dataset that was read and checked (its profile is the current one)."""
        profiled = (plan_state.get("profile") or {}).get("dataset_label")
        if profiled != wizard.dataset_label(dataset):
            update = self.on_profile(plan_state, dataset, model)  # raises with the problem (the row) named
            return {**update, **self.go(3)}
        return self.go(3)

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
        profiled = {**profile.to_dict(), "dataset_label": wizard.dataset_label(dataset)}
        return {self.page.plan_state: {**plan_state, "profile": profiled},
                self.page.profile_table: wizard.profile_rows(profile), self.page.histogram: histogram}

    def on_preview(self, plan_state, rows, **values):
        """Step 2: a few rows of the plan's SFT data as the trainer tokenizes them (trainer.preview, in a
        subprocess), loss tokens highlighted, and every checked row left without loss named with the fix."""
        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        plan = self.page_plan(plan_state, {**values, "dataset": self.dataset_path(plan_state, values.get("dataset"))})
        rows = int(rows) if isinstance(rows, (int, float)) and not isinstance(rows, bool) else 3
        result = preview.preview(plan, rows, self.config.generate_timeout_s)
        note = preview.preview_markdown(result)
        if plan.stage != "sft" and plan.pipeline == "none":
            note = (f"_The preview shows SFT's loss; the {plan.stage} stage scores whole replies (the rows are "
                    "shown as SFT would train on them)._\n\n" + note)
        return {self.page.preview_note: self.shown(note), self.page.preview_html: self.shown(preview.preview_html(result))}

    def recommend(self, plan_state, keep_changes: bool, values: dict, overrides: dict | None = None) -> dict:
        """Ask the advisor (keeping the plan widgets the user changed when `keep_changes`, or `overrides`) and
        fill them in."""
        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        advisor_values = {name: values[name] for name in wizard.ADVISOR_WIDGETS}
        if keep_changes:
            overrides = wizard.user_changes(values, plan_state.get("advice"))
        advised = wizard.advise(advisor_values, plan_state.get("profile"), overrides,
                                max_steps=self.step_cap(values, keep_changes), measured_lr=self.measured_lr(plan_state, values))
        widget_values = wizard.widgets_from_plan(advised.plan)
        guide_headers, guide_rows = wizard.guide_rows()
        updates = {widget: (gr.update(value=widget_values[name], choices=advised.target_choices)
                            if name == "lora_targets" else widget_values[name])
                   for name, widget in self.page.advised_widgets.items()}
        return {self.page.plan_state: {**plan_state, "advice": advised.values}, **updates,
                self.page.guide_table: {"headers": guide_headers, "data": guide_rows},
                self.page.guide_note: wizard.guide_note(), self.page.advice_notes: advised.notes_markdown}

    def step_cap(self, values: dict, keep_changes: bool) -> int | None:
        """The cap on the advised run's length: the user's own "Max steps" when re-advising with their changes;
        else the demo's step budget for the demo model (or any run of the public demo), and none for a real
        model, whose length comes from its data and epochs."""
        if keep_changes:
            return wizard.step_cap(values.get("max_steps"))
        demo = self.config.demo_mode or is_demo_model(values.get("model"))
        return self.demo_limits.max_steps if demo else None

    @staticmethod
    def measured_lr(plan_state: dict, values: dict) -> dict | None:
        """The pilot's result ({"rate", "reason", "method", ...}) when it was measured for this page's model, data
        and goal (a re-advice keeps it); None otherwise."""
        pilot = plan_state.get("pilot") or {}
        same = all(pilot.get(key) == values.get(key) for key in ("model", "dataset", "goal"))
        return pilot if pilot and same else None

    def on_recommend(self, plan_state, **values):
        """Reaching the plan step: the advice for steps 1 and 2's choices. Coming back to it (after going back
        to change the data or the model), the values the user set in the plan step stay theirs."""
        if plan_state.get("advice"):
            return self.recommend(plan_state, False, values,
                                  overrides=wizard.user_changes(values, plan_state["advice"]) or None)
        return self.recommend(plan_state, False, values)

    def on_readvise(self, plan_state, **values):
        return self.recommend(plan_state, True, values)

    def on_load_recommend(self, plan_state, **values):
        """On page load: the advice, keeping what the user had changed before a reload (see on_restore)."""
        restored = plan_state.get("restored_changes")
        if restored is None:
            return self.recommend(plan_state, False, values)
        kept = {name: values[name] for name in restored if name in values}
        return self.recommend({**plan_state, "restored_changes": None}, False, values, overrides=kept)

    # -- moving between steps: the walkthrough and the step bar above it -----------------------------------

    def go(self, step: int, furthest: int = 1) -> dict:
        """The page on `step`: the walkthrough, and the step bar with `step` marked and every step up to the
        furthest reached (`furthest`, or `step`) open. (A step opened before stays open: the bar's buttons
        keep what they are not told.)"""
        p = self.page
        opened = wizard.open_steps(step, furthest)
        updates = {p.walkthrough: gr.Walkthrough(selected=step)}
        for number, button in zip(wizard.STEPS, p.step_bar):
            updates[button] = gr.update(variant="primary" if number == step else "secondary",
                                        **({"interactive": True} if number in opened else {}))
        return updates

    def step_bar_to(self, target: int) -> Callable:
        """The handler of the step bar's button for `target`, given the step the page is on (`at`, read from
        the page): Next's checks on the way forward (the model leaving step 1, the data leaving step 2; each
        refusal names what to fix, and the page stays), nothing going back."""

        def on_step_bar(at, plan_state, dataset, model):
            at = _step_of(at)
            checks = wizard.checks_on_the_way(at, target)
            updates = {}
            if "model" in checks:
                self.on_next_model(model)
            if "data" in checks:
                updates = self.on_next_data(plan_state, dataset, model)
            return {**updates, **self.go(target), self.page.step_at: at}

        return on_step_bar

    def past_the_data_step(self, target: int, then: str) -> Callable:
        """After a step-bar jump from `at` to `target`: when the jump went past step 2, what Next into the plan
        step runs (`then`: "advise", the advice for steps 1 and 2's choices, the user's own plan edits staying
        theirs; "estimate", the plan's memory for that advice); otherwise nothing changes."""
        handler = {"advise": self.on_recommend, "estimate": self.on_estimate}[then]

        def on_the_way(at, plan_state, **values):
            if "data" in wizard.checks_on_the_way(_step_of(at), target):
                return handler(plan_state, **values)
            # (an empty dict would leave the API call without an answer)
            return {self.page.plan_state: plan_state} if then == "advise" else {self.page.plan_status: gr.update()}

        return on_the_way

    # -- a reload keeps the wizard -------------------------------------------------------------------------

    def remember_at(self, step: int) -> Callable:
        """The handler that saves the wizard in the browser (gr.BrowserState) after an event that leaves the
        page on `step` (with the furthest step reached, which the step bar opens again after a reload)."""

        def on_remember(plan_state, monitor_state, saved, **values):
            _, furthest = wizard.saved_step(saved)
            record = wizard.session_record(
                values, wizard.user_changes(values, plan_state.get("advice")), step, self.secret,
                own=monitor_state.get("own") or [], uploads=plan_state.get("uploads") or {},
                run_id=monitor_state.get("run_id"), furthest=furthest)
            return {self.page.saved: record}

        return on_remember

    def on_start_over(self, plan_state, monitor_state):
        """The record of a fresh wizard that still knows this browser's runs and uploads (the page reloads)."""
        return {self.page.saved: wizard.session_record({}, (), 1, self.secret, own=monitor_state.get("own") or [],
                                                       uploads=plan_state.get("uploads") or {})}

    def on_restore(self, saved, plan_state, monitor_state):
        """On page load: the wizard as this browser left it (values, step, and in the public demo its own runs
        and uploads when the record's signature verifies). Nothing saved: the page as it starts."""
        try:  # never an error: the rest of the page load runs after this one (Gradio runs .then on success)
            restored = wizard.restore_session(saved, self.secret)
        except Exception:  # noqa: BLE001 (a damaged record: start fresh, and say why in the log)
            LOG.warning("ignored a saved wizard that could not be read:\n%s", traceback.format_exc())
            restored = None
        p = self.page
        if restored is None:
            return {p.plan_state: plan_state}  # (an empty dict would leave the API call without an answer)
        updates = {}
        for name, value in restored.values.items():
            widget = getattr(p, name)
            if name == "lora_targets" and isinstance(value, list):
                updates[widget] = gr.update(choices=value, value=value)  # the advice brings the model's own choices
            elif value is not None:
                updates[widget] = value
        plan_state = {**plan_state, "restored_changes": list(restored.changed)}
        if restored.trusted:
            plan_state["uploads"] = restored.uploads or {}
            monitor_state = {**monitor_state, "own": list(restored.own)}
            if restored.run_id and (not self.config.demo_mode or restored.run_id in restored.own):
                monitor_state = monitoring(monitor_state, restored.run_id)
        return {**updates, p.plan_state: plan_state, p.monitor_state: monitor_state,
                **self.go(restored.step, restored.furthest)}

    def on_estimate(self, plan_state, **values):
        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        plan = self.page_plan(plan_state, values)  # an upload keeps its name here: the page shows the plan
        measured = self.measured_lr(plan_state, values)
        view = wizard.plan_view(plan, measured_lr=float(measured["rate"]) if measured else None)
        (headers, memory_rows), (fit_headers, fit_rows) = view.memory, view.fit
        p = self.page
        return {
            p.memory_table: {"headers": headers, "data": memory_rows},
            p.memory_plot: figures.memory_figure(view.stacked, view.gpu_bytes, view.gpu_label, title=view.chart_title),
            p.fit_table: {"headers": fit_headers, "data": fit_rows},
            p.recommendations: wizard.recommendation_rows(plan_state.get("advice") or {}, wizard.widgets_from_plan(plan)),
            p.plan_status: view.status_markdown,
            p.explanations: view.explanations,
            p.cli_text: wizard.train_command(plan),
            p.yaml_text: wizard.plan_yaml(plan),
            p.pilot_cost: self.pilot_cost(plan, plan_state.get("profile"), plan_state.get("pilot_budget")),
        }

    # -- step 3: the learning-rate pilot (trainer/pilot.py) ---------------------------------------------------

    def pilot_cost(self, plan, profile: dict | None, budget_minutes: float | None = None) -> str:
        """What the check would do and cost, shown before the click (or why it cannot run for this plan), for
        the budget in the page's box (None: the default share of the run)."""
        from advisor.pilot import plan_pilot

        profile = profile or {}
        try:
            design = plan_pilot(plan, examples=profile.get("examples") or None, budget_minutes=budget_minutes,
                                tokens=(profile.get("tokens") or {}).get("estimated_total") or None,
                                budget_name=PILOT_BUDGET_NAME)
        except TunewiseError as exc:
            return f"The check cannot run for this plan: {user_message(exc)}"
        return (f"Short runs at {len(design.rates)} learning rates on your model and data, scored by held-out loss: "
                f"{design.describe()}. **Expected cost: about {figures.format_duration(design.expected_s)}.**")

    def pilot_view(self, pilot_state: dict, events: list, state: str | None) -> dict:
        p = self.page
        return {p.pilot_status: self.shown(figures.pilot_markdown(events, state)),
                p.pilot_loss_plot: figures.pilot_loss_figure(events), p.pilot_rate_plot: figures.pilot_rate_figure(events)}

    def pilot_minutes(self, pilot_budget) -> float | None:
        """The budget box's minutes (None: the default share), within the public demo's cap in demo mode."""
        return wizard.pilot_budget(pilot_budget, self.demo_limits if self.config.demo_mode else None)

    def on_pilot_budget(self, plan_state, pilot_budget, **values):
        """The check's budget box edited: the budget kept for this page and the expected cost shown for it (a
        value that is not a budget is refused with the box's name, and the previous budget stays)."""
        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        minutes = self.pilot_minutes(pilot_budget)
        plan_state = {**plan_state, "pilot_budget": minutes}
        plan = self.page_plan(plan_state, values)
        return {self.page.plan_state: plan_state,
                self.page.pilot_cost: self.pilot_cost(plan, plan_state.get("profile"), minutes)}

    def on_pilot(self, pilot_state, monitor_state, plan_state, pilot_budget=None, **values):
        from trainer.pilot import pilot_design

        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        minutes = self.pilot_minutes(pilot_budget)
        plan = wizard.plan_from_widgets({**values, "dataset": self.dataset_path(plan_state, values.get("dataset"))})
        with self.launch_lock:
            if self.config.demo_mode:
                plan, _ = wizard.admit_demo_run(plan, self.demo_limits, runs.active_runs(self.config.runs_dir),
                                                monitor_state.get("own") or [])
            design = pilot_design(plan, budget_minutes=minutes, budget_name=PILOT_BUDGET_NAME)
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
                p.plan_status: wizard.plan_view(plan, measured_lr=rate).status_markdown,
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
        events, offset = supervisor.read_run_events(run_id, monitor_state.get("offset", 0),
                                                    self.runs_dir_of(monitor_state, run_id))
        try:
            status = supervisor.status(run_id, self.runs_dir_of(monitor_state, run_id))
        except TunewiseError:  # the run directory was deleted: show what was read
            status = None
        all_events = monitor_state.get("events", []) + events
        monitor_state = {**monitor_state, "offset": offset, "events": all_events}
        still_going = status is not None and status.state in ("queued", "running")
        update = {p.monitor_state: monitor_state, p.timer: gr.Timer(active=still_going or bool(events)),
                  p.run_header: self.shown(figures.run_header_html(run_id, figures.run_progress(all_events), status))}
        if monitor_state.get("log_open") and events:  # the log tail follows the run it shows
            update[p.log_tail] = self.log_text(monitor_state, run_id)
        if not events and monitor_state.get("drawn"):
            return update
        monitor_state["drawn"] = True
        series = figures.reward_kl_series(all_events)
        return {**update, p.loss_plot: figures.loss_figure(all_events),
                p.forgetting_plot: figures.forgetting_figure(all_events),
                p.memory_run_plot: figures.memory_run_figure(all_events),
                p.reward_time_plot: figures.reward_kl_time_figure(all_events),
                p.reward_kl_plot: figures.reward_vs_kl_figure(all_events),
                p.alerts: figures.alerts_markdown(figures.alert_messages(all_events),
                                                  [self.shown(n) for n in figures.notice_messages(all_events)]),
                p.reward_row: gr.Row(visible=bool(series["reward"][0] or series["kl"][0])),
                p.comparison: (gr.update(value=table, visible=True) if (table := figures.comparison_table(all_events))
                               else gr.update(visible=False))}

    def watch(self, monitor_state: dict, run_id: str) -> dict:
        """Watch `run_id` in step 4 from its first event."""
        return {**self.go(4), **self.poll(monitoring(monitor_state, run_id))}

    def on_launch(self, monitor_state, plan_state, **values):
        self.demo_guard(values.get("model"), values.get("dataset"), plan_state)
        plan = self.page_plan(plan_state, {**values, "dataset": self.dataset_path(plan_state, values.get("dataset"))})
        notes: list[str] = []
        with self.launch_lock:
            active = runs.active_runs(self.config.runs_dir)
            if self.config.demo_mode:
                plan, notes = wizard.admit_demo_run(plan, self.demo_limits, active, monitor_state.get("own") or [])
                runs.cleanup_old_runs(self.config.runs_dir, self.config.uploads_dir, self.demo_limits.keep_runs - 1)
            elif active:  # one machine, one run: a second one would run both out of memory (or at half speed)
                raise TunewiseError(wizard.machine_busy_message(active[0], plan), field="queue")
            # An upload goes into the run's own folder: the run keeps its data when old uploads are cleaned.
            uploaded = runs.is_upload(plan.data.dataset, self.config.uploads_dir)
            if not self.config.demo_mode or gpus.this_machine().has_nvidia_gpu:
                # Kept chat models would share the run's GPU (or, on a CPU box, its RAM); the CPU demo's tiny
                # model leaves other visitors' chats alone.
                chat.close_sessions()
            run_id = supervisor.launch(plan, self.config.runs_dir, copy_dataset=uploaded)
        if self.config.warm_worker:  # the worker may have gone (idle, or orphaned by a restart): ready one for next time
            threading.Thread(target=warm.ready_for, args=(self.config.runs_dir, os.getpid()), daemon=True).start()
        if notes:
            gr.Info("Demo limits applied: " + "; ".join(notes))
        return self.watch({**monitor_state, "own": [*(monitor_state.get("own") or []), run_id]}, run_id)

    def on_export_job(self, scheduler, **values):
        """Write a cluster job for the plan on the page into this app's runs folder (trainer.jobs): it shows in
        the history once it starts, and the monitor watches it like a local run."""
        if self.config.demo_mode:
            raise TunewiseError("job: the public demo does not write cluster jobs; install Tunewise and use "
                                "`tunewise job` on your cluster", field="job")
        job = jobs.write_job(wizard.plan_from_widgets(values), scheduler, self.config.runs_dir)
        return {self.page.job_note: job.markdown()}

    def current_run(self, monitor_state: dict, what: str) -> str:
        """The watched run's id (one this visitor may drive), or TunewiseError saying there is nothing to `what`."""
        run_id = monitor_state.get("run_id")
        if not run_id:
            raise TunewiseError(f"run: nothing to {what}; launch a run or open one from the history first", field="run")
        self.run_dir(monitor_state, run_id)
        return run_id

    def on_stop(self, monitor_state):
        run_id = self.current_run(monitor_state, "stop")
        current = supervisor.status(run_id, self.runs_dir_of(monitor_state, run_id))
        # stop() waits for the run to save and exit, then kills it (after a wait scaled to this run's own step,
        # save and measurement times): in the background, so the page stays live; the header shows the end.
        threading.Thread(target=supervisor.stop, args=(run_id,), kwargs={"runs_dir": self.runs_dir_of(monitor_state, run_id)},
                         daemon=True).start()
        step = f" (a step takes about {current.step_s:.1f} s)" if current.step_s else ""
        gr.Info(f"Stop requested: {run_id} finishes its current step{step}, saves a checkpoint and ends. If it has "
                f"not ended within {current.stop_wait_s:.0f} s it is killed, and then no checkpoint is saved; the "
                "header says which happened.")
        return self.poll(monitor_state)

    def on_resume(self, monitor_state):
        run_id = self.current_run(monitor_state, "resume")
        with self.launch_lock:
            if self.config.demo_mode and runs.active_runs(self.config.runs_dir):
                raise TunewiseError("queue: the public demo trains one run at a time; wait for the current run to end",
                                    field="queue")
            supervisor.resume(run_id, self.runs_dir_of(monitor_state, run_id))
        gr.Info(f"Resuming {run_id} from its last checkpoint.")
        return self.poll(monitor_state)

    def on_log_tail(self, monitor_state):
        run_id = monitor_state.get("run_id")
        if not run_id:
            return {self.page.log_tail: gr.update(visible=True, value="(no run selected)")}
        return {self.page.log_tail: gr.update(visible=True, value=self.log_text(monitor_state, run_id)),
                self.page.monitor_state: {**monitor_state, "log_open": True}}

    def log_text(self, monitor_state: dict, run_id: str) -> str:
        log = self.run_dir(monitor_state, run_id) / STDOUT_FILE
        return self.shown("\n".join(tail_lines(log, 60)) if log.is_file() else f"({log.name} does not exist yet)")

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

    def on_runs(self, monitor_state, tag=None, stage=None, state=None):
        """The history (this visitor's runs in demo mode; also the runs of the folder opened in step 5), filtered
        by tag, stage and state ("all": no filter)."""
        statuses = sorted((status for folder in self.runs_dirs(monitor_state)
                           for status in runs.history(folder, only=self.own_runs(monitor_state))),
                          key=lambda status: status.created_at or 0, reverse=True)
        statuses = supervisor.filter_runs(statuses, tag=wizard.history_filter(tag), stage=wizard.history_filter(stage),
                                          state=wizard.history_filter(state))
        ids = [status.run_id for status in statuses]
        # The newest run that did not fail is picked and its curve drawn, so the step opens on something to see.
        picked = wizard.preselected_run(statuses)
        return {self.page.runs_table: {"headers": wizard.RUN_HEADERS, "data": [wizard.run_row(s) for s in statuses]},
                self.page.open_run: gr.update(choices=ids, value=picked),
                self.page.compare_runs: gr.update(choices=ids, value=[picked] if picked else [])}

    def on_other_runs_dir(self, folder, monitor_state):
        """Step 5: show the runs of another runs folder too (blank, or the app's own: only the app's)."""
        if self.config.demo_mode:
            raise TunewiseError("runs folder: the public demo shows each visitor only the runs they launched here",
                                field="runs folder")
        text = str(folder or "").strip()
        path = Path(text).expanduser().resolve() if text else None
        if path is not None and is_run_dir(path):
            path = path.parent  # a run's own folder given: the folder that holds it
        if path is None or path == self.config.runs_dir:
            path = None
        elif not path.is_dir():
            raise TunewiseError(f"runs folder: {text} is not a folder on the machine this app runs on; give the folder "
                                "`tunewise train` wrote to (its --runs-dir, or ./runs where it ran)", field="runs folder")
        elif not any(is_run_dir(child) for child in path.iterdir() if child.is_dir()):
            raise TunewiseError(f"runs folder: {path} holds no runs (no sub-folder with a run.json); a runs folder is "
                                "the one that holds the run folders, not a run folder itself", field="runs folder")
        state = {**monitor_state, "other_runs_dir": str(path) if path else None}
        return {self.page.monitor_state: state, **self.on_runs(state)}

    def on_pick_run(self, run_id, monitor_state):
        """A run picked in step 5: its pipeline steps (final policy first choice), the QLoRA merge option."""
        p = self.page
        hidden = {p.open_step: gr.update(choices=[], value=None, visible=False),
                  p.export_reload: gr.update(visible=False, value=False), p.delete_confirm: gr.update(visible=False)}
        if not run_id:
            return {**hidden, p.run_note: ""}
        outputs = rundir.model_outputs(self.run_dir(monitor_state, run_id))
        if not outputs:
            return {**hidden, p.run_note: "This run has no output or checkpoint yet: it saves one when it finishes, "
                                          "when a stop ends in time, and at every checkpoint interval."}
        final = rundir.final_output(self.run_dir(monitor_state, run_id), policy=any(o.policy for o in outputs))
        steps = [o.label for o in outputs]
        qlora = supervisor.status(run_id, self.runs_dir_of(monitor_state, run_id)).method == "qlora"
        return {p.open_step: gr.update(choices=steps, value=final.label, visible=len(outputs) > 1 or final.label != "output"),
                p.export_reload: gr.update(visible=qlora, value=False), p.delete_confirm: gr.update(visible=False),
                p.run_note: ("" if not final.checkpoint else f"{final.label} saved no output yet: samples and export "
                             f"use its newest complete checkpoint ({final.path.name}).")}

    def relabel(self, run_id, monitor_state, filters, **changes) -> dict:
        if not run_id:
            raise TunewiseError("run: pick the run in the list first", field="run")
        changed = supervisor.relabel(self.run_dir(monitor_state, run_id), self.config.runs_dir, **changes)
        labels = wizard.run_labels(changed)
        shown = self.on_runs(monitor_state, *filters)
        picker = shown[self.page.open_run]  # keep the run picked when the filters still show it
        if run_id in (picker.get("choices") or []):
            picker["value"] = run_id
        return {**shown, self.page.run_note: f"**{run_id}**: {labels if labels != '-' else 'no name or tags'}."}

    def on_rename(self, run_id, name, monitor_state, *filters):
        """Give the picked run a display name (meta.json; the run id stays)."""
        return self.relabel(run_id, monitor_state, filters, name=name if isinstance(name, str) else "")

    def on_tag(self, run_id, tag, monitor_state, *filters):
        return self.relabel(run_id, monitor_state, filters, add_tags=(tag if isinstance(tag, str) else "",))

    def on_untag(self, run_id, tag, monitor_state, *filters):
        return self.relabel(run_id, monitor_state, filters, remove_tags=(tag if isinstance(tag, str) else "",))

    def on_tag_choices(self, monitor_state):
        """The tag filter's choices: every tag of this visitor's runs."""
        statuses = [status for folder in self.runs_dirs(monitor_state)
                    for status in runs.history(folder, only=self.own_runs(monitor_state))]
        tags = sorted({tag for status in statuses for tag in status.tags})
        return {self.page.filter_tag: gr.update(choices=[wizard.ALL, *tags])}

    def on_delete(self, run_id, monitor_state):
        """First click: ask. The confirmation button does the deleting."""
        if not run_id:
            raise TunewiseError("run: pick the run to delete in the list first", field="run")
        current = supervisor.status(self.run_dir(monitor_state, run_id), self.runs_dir_of(monitor_state, run_id))
        if current.active:
            raise TunewiseError(f"run: {run_id} is still {current.state}; stop it in step 4 before deleting it", field="run")
        return {self.page.delete_confirm: gr.update(visible=True),
                self.page.run_note: f"Delete **{run_id}** ({current.state}) and everything in its folder (checkpoints, "
                                    "outputs, logs)? This cannot be undone."}

    def on_delete_confirm(self, run_id, monitor_state):
        chat.close_sessions(self.run_dir(monitor_state, run_id))  # its kept chat worker has its files open
        deleted = supervisor.delete(run_id, self.runs_dir_of(monitor_state, run_id))
        own = [r for r in (monitor_state.get("own") or []) if r != deleted]
        monitor_state = {**monitor_state, "own": own}
        if monitor_state.get("run_id") == deleted:
            monitor_state = monitoring(monitor_state, None)
        return {**self.on_runs(monitor_state), self.page.monitor_state: monitor_state,
                self.page.delete_confirm: gr.update(visible=False), self.page.run_note: f"Deleted {deleted}."}

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

    def on_generate(self, run_id, prompts, monitor_state, step=None):
        if not run_id:
            raise TunewiseError("run: pick a finished run in the list first", field="run")
        run_dir = self.run_dir(monitor_state, run_id)
        lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
        rows = samples.generate(run_dir, lines, self.config.generate_timeout_s, step=step or None)
        return {self.page.samples_table: rows}

    def on_adapter_download(self, run_id, monitor_state, step=None):
        """Step 5's "Download the adapter": the adapter alone (small), with its adapter_config.json."""
        if not run_id:
            raise TunewiseError("run: pick a finished run in the list first", field="run")
        archive, note = runs.adapter_archive(self.run_dir(monitor_state, run_id), self.config.exports_dir,
                                             step=step or None)
        return {self.page.export_note: self.shown(note), self.page.export_file: archive}

    def on_export(self, run_id, reload_16bit, monitor_state, step=None):
        if not run_id:
            raise TunewiseError("run: pick a finished run in the list first", field="run")
        archive, note = runs.export(self.run_dir(monitor_state, run_id), self.config.exports_dir, bool(reload_16bit),
                                    self.config.generate_timeout_s, step=step or None)
        return {self.page.export_note: self.shown(note), self.page.export_file: archive}

    # -- step 5: chat with the tuned model (trainer.chat, one worker process per reply) ------------------------

    def on_chat(self, run_id, step, message, tuned_history, base_history, system, temperature, top_p,
                max_new_tokens, compare, monitor_state):
        """Stream the tuned model's reply (and the base model's, when comparing) into the chat, token by token.
        Each model keeps its own conversation; the reply is bounded by AppConfig.chat_timeout_s and the
        new-token cap (lower in demo mode, which chats only with the visitor's own runs of the demo model)."""
        p = self.page
        if not run_id:
            raise TunewiseError("run: pick a finished run in the list first", field="run")
        run_dir = self.run_dir(monitor_state, run_id)
        text = message.strip() if isinstance(message, str) else ""
        if not text:
            raise TunewiseError("chat: write a message first", field="chat")
        cap = self.config.demo_chat_max_new_tokens if self.config.demo_mode else chat.MAX_NEW_TOKENS_CAP
        if isinstance(max_new_tokens, (int, float)) and not isinstance(max_new_tokens, bool):
            max_new_tokens = int(min(max_new_tokens, cap))
        said = {"role": "user", "content": text}
        shown = {"tuned": chat.clean_history(tuned_history) + [said],
                 "base": chat.clean_history(base_history) + [said] if compare else None}
        request = {"tuned": shown["tuned"], "base": shown["base"], "system": system, "temperature": temperature,
                   "top_p": top_p, "max_new_tokens": max_new_tokens, "demo": self.config.demo_mode}
        events = chat.stream_chat(run_dir, request, self.config.chat_timeout_s, step=step or None)
        for model in ("tuned", "base"):
            if shown[model] is not None:
                shown[model] = [*shown[model], {"role": "assistant", "content": ""}]
        notes: list[str] = []

        def update(note: str):
            return {p.chat_message: "", p.chat_tuned: shown["tuned"],
                    p.chat_base: gr.update(value=shown["base"] or [], visible=bool(compare)),
                    p.chat_note: self.shown(note)}

        yield update("Asking the model (its process loads the models for the first message)...")
        for event in events:
            kind, model = event.get("event"), event.get("model", "tuned")
            if kind == "token" and shown.get(model) is not None:
                shown[model][-1]["content"] += str(event.get("text", ""))
                yield update(" ".join(notes) or "Answering...")
            elif kind == "done" and shown.get(model) is not None:
                shown[model][-1]["content"] = str(event.get("text", ""))
                first = event.get("first_token_s")
                notes.append(f"{model}: {event.get('new_tokens')} new tokens"
                             + (f", first after {first:.2f} s" if isinstance(first, (int, float)) else "") + ".")
                yield update(" ".join(notes))
            elif kind == "timeout":
                for reply in (shown["tuned"], shown["base"]):
                    if reply is not None:
                        reply[-1]["content"] = (reply[-1]["content"] + " ... (cut off)").strip()
                yield update(f"Stopped: {event.get('message')}")
                return
            elif kind == "error":
                raise TunewiseError(str(event.get("message")), field="chat")
            elif kind == "end":
                kept = f"kept loaded for {chat.SESSION_IDLE_S / 60:g} min between messages"
                where = f" on the {event['device'].upper()}" if event.get("device") else ""
                loaded = (f"Models already loaded{where} ({kept})." if event.get("reused") else
                          f"Models loaded{where} in {event.get('load_s', 0):.1f} s ({kept}).")
                yield update(" ".join(notes) + " " + loaded)

    def on_chat_clear(self):
        p = self.page
        return {p.chat_tuned: [], p.chat_base: [], p.chat_note: "", p.chat_message: ""}

    # -- plans in and out: a plan.yaml (or a run's plan) fills every widget; "Save plan" downloads the page's --

    def page_plan(self, plan_state: dict, values: dict):
        """The plan the page shows: its widgets over the plan last loaded (which keeps what no widget shows)."""
        return wizard.plan_from_widgets(values, base=wizard.loaded_plan_base(plan_state))

    def show_plan(self, plan_state: dict, plan, source: str) -> dict:
        """Fill every plan widget (the Advanced settings too) with `plan`, and remember it as the page's base."""
        self.demo_guard(model=plan.model.name)
        values = wizard.widgets_from_plan(plan)
        p = self.page
        updates = {widget: (gr.update(value=values[name], choices=sorted(set(values[name]) | {"q_proj", "k_proj", "v_proj", "o_proj"}))
                            if name == "lora_targets" else values[name])
                   for name, widget in p.plan_widgets.items()}
        return {p.plan_state: {**plan_state, "loaded_plan": plan.to_dict()}, **updates,
                p.plan_io_note: self.shown(f"Loaded the plan from {source}: every setting is on the page; edit it, then "
                                           "launch or save it.")}

    def on_load_plan_file(self, plan_state, plan_file):
        if not plan_file:
            return {}
        if str(Path(plan_file).resolve()) not in {str(Path(f).resolve()) for f in self.uploaded_here}:
            raise TunewiseError("plan: only a file sent through the upload box can be loaded", field="plan")
        path = Path(plan_file)
        if path.stat().st_size > wizard.MAX_PLAN_BYTES:
            raise TunewiseError(f"plan: {path.name} is {path.stat().st_size:,} bytes; a plan file is a few kB "
                                f"(at most {wizard.MAX_PLAN_BYTES:,})", field="plan")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TunewiseError(f"plan: {path.name} is not UTF-8 text (a plan.yaml is)", field="plan") from None
        plan = wizard.plan_from_file_text(text, path.name)
        return self.show_plan(plan_state, plan, path.name)

    def on_load_run_plan(self, plan_state, run_id, monitor_state):
        """Step 5 -> 3: the picked run's plan (plan.yaml in its directory) fills the wizard, to edit and launch again."""
        if not run_id:
            raise TunewiseError("run: pick a run in the list first", field="run")
        run_dir = self.run_dir(monitor_state, run_id)
        plan = wizard.plan_from_file_text((run_dir / rundir.PLAN_FILE).read_text(encoding="utf-8"), f"run {run_id}")
        return {**self.show_plan(plan_state, plan, f"run {run_id}"), **self.go(3)}

    def on_save_plan(self, plan_state, **values):
        """The plan.yaml of what the page shows (the text "Show as YAML" shows), as a file to download."""
        plan = self.page_plan(plan_state, values)
        folder = Path(tempfile.mkdtemp(prefix="tunewise-plan-"))
        saved = plan.save(folder / "plan.yaml")
        return {self.page.plan_download: str(saved), self.page.plan_io_note: "Saved: download plan.yaml below; "
                "`tunewise train plan.yaml` runs it from a terminal."}
