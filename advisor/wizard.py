"""The wizard's logic, without the wizard: widget values in, plans and table rows out.

`app.py` holds only layout and event wiring. Everything it needs to decide is
here, as pure functions that tests call directly:

- `plan_from_widgets(values)`: THE one function turning the page's widget
  values (a dict keyed by widget name, see `PLAN_WIDGETS`) into a validated
  `Plan`. Both the memory preview and the launch button go through it, so what
  you see estimated is what runs.
- `apply_demo_limits(plan, limits)`: the public-demo policy (demo model only,
  bounded steps), enforced on the server.
- `*_rows(...)`: turn model specs, memory estimates, GPU fits, recommendations,
  dataset profiles and run statuses into rows for the page's tables.
- `train_command(plan)` / `plan_yaml(plan)`: the "Show as YAML / CLI" text.

Widget names, labels and ranges are not kept here: they come from the plan's own
description of each setting (`advisor.plan.settings()`).

Pure Python: no gradio, torch or transformers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping, Sequence

from advisor.errors import TunewiseError
from advisor.plan import Plan, PlanError, find_setting, settings
from advisor.profile import SUFFIX_FORMATS
from advisor.recommend import ADVICE

GB = 1e9
"""Bytes per GB (decimal, as GPU vendors count)."""

NO_GPU = "none"
"""The GPU choice meaning "no GPU: demo on the CPU"."""

#: The "stage or pipeline" choice: (label shown, value). A value is a stage name or "pipeline:<name>".
GOAL_CHOICES = (
    ("Supervised fine-tuning (SFT)", "sft"),
    ("DPO on preference pairs", "dpo"),
    ("Reward model on preference pairs", "rm"),
    ("PPO against a reward model", "ppo"),
    ("RLHF pipeline: SFT -> reward model -> PPO", "pipeline:rlhf"),
    ("DPO pipeline: SFT -> DPO", "pipeline:dpo"),
    ("Compare both pipelines side by side", "pipeline:compare"),
)

#: Task complexity choices (label, advisor value): the guide's rank table rows.
TASK_CHOICES = (
    ("Simple: classification", "classification"),
    ("Medium: QA", "qa"),
    ("Medium: summarization", "summarization"),
    ("Complex: instruction following", "instruction"),
    ("Maximum adaptation", "max"),
)

#: How far the task is from what the model saw in pretraining.
DOMAIN_CHOICES = (("Close to pretraining", "low"), ("Somewhat different", "medium"), ("Very different", "high"))

#: What to favour when the two conflict.
PRIORITY_CHOICES = (("Best quality", "quality"), ("Balanced", "balanced"), ("Least memory", "memory"))

#: Widget name -> the plan setting it edits (dotted): every setting with a widget (`Setting.widget`), by its
#: short name. `goal` is special (stage + pipeline) and `gpu` maps "none" to no GPU. Widget names are also
#: the API's parameter names.
#: The plan settings the page shows nowhere else (the stage and pipeline come from the goal, the device from
#: the GPU; examples and tokens are the advisor's record of the data): step 3's "Advanced settings" group
#: gives each a widget made from its description (label, range, choices, help), so every plan setting is
#: reachable in the wizard.
_ELSEWHERE = ("stage", "pipeline", "data.examples", "data.tokens", "hardware.device")
ADVANCED_SETTINGS = tuple(s for s in settings() if not s.widget and s.dotted not in _ELSEWHERE)

PLAN_WIDGETS: dict[str, str] = {"goal": "stage", **{s.name: s.dotted for s in settings() if s.widget},
                                **{s.name: s.dotted for s in ADVANCED_SETTINGS}}
_ON_PAGE = {s.name for s in settings() if s.widget} | {s.name for s in ADVANCED_SETTINGS}

#: Widgets that hold a name (what the name may be, for messages).
TEXT_WIDGETS = {
    "model": "a catalogue name, a hub id owner/name or a size like 7B",
    "dataset": "a bundled dataset name, a file you uploaded, or a file path",
}

#: Widgets whose empty value means "not set" (None in the plan) rather than an error.
OPTIONAL_WIDGETS = tuple(s.name for s in settings() if s.name in _ON_PAGE and s.optional)

#: Human names for plan settings, used in messages and the recommendation table.
LABELS = {s.dotted: s.label for s in settings()}

#: Where a number box starts when not at its setting's own lowest value (a range open at its low end has
#: no lowest value: the plan refuses it). 0 max steps means "run the epochs".
_PAGE_LOWS: dict[str, float] = {"epochs": 0.01, "max_steps": 0, "seq_len": 8, "forgetting_threshold": 0.1,
                                "beta": 0.001, "kl_coef": 0.001}
#: Number widgets: (lowest, highest) value the page takes, from the plan's own range (advisor.plan
#: FIELD_LIMITS), so one description decides the page, the API, the CLI and the planner. The page's boxes
#: are bounded by it and `plan_from_widgets` refuses anything outside it, so a crafted API call cannot send
#: a value the page could not.
NUMBER_LIMITS: dict[str, tuple[float | None, float | None]] = {
    s.name: (_PAGE_LOWS.get(s.name, None if s.limit.low_open else s.limit.low), s.limit.high)
    for s in settings() if s.name in _ON_PAGE and s.limit is not None
}


#: Optional numbers the page shows as text boxes (empty: not set): those unset in a fresh plan.
NUMBER_TEXT_WIDGETS = tuple(s.name for s in ADVANCED_SETTINGS if s.type in (int, float) and s.default is None)


def _number_from_text(text: str, dotted: str) -> Any:
    """A text box's number: None when empty, else an int or a float (PlanError naming the setting)."""
    text = text.strip().replace(",", "")
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        raise PlanError(dotted, f"{LABELS.get(dotted, dotted)} must be a number (or empty: not set), got {text!r}") from None
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def _show_number(value: float | int) -> str:
    """A number for a message: 1e+30 rather than 31 digits (and no OverflowError for a huge int)."""
    try:
        return f"{value:g}"
    except OverflowError:
        return f"a number with {len(str(abs(value)))} digits"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number_problem(value: Any, low: float | None, high: float | None) -> str | None:
    """What is wrong with `value` for a number box bounded by [low, high], or None when it fits (None
    itself fits: an empty box is judged by whoever reads it). The text reads after the field's name."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be a number, got {_short(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if (low is not None and value < low) or (high is not None and value > high):
        fits = (f"from {low:,g} to {high:,g}" if low is not None and high is not None
                else f"at least {low:,g}" if low is not None else f"at most {high:,g}")
        return f"{_show_number(value)} is out of range; enter a value {fits}"
    return None


def text_value(value: Any, dotted: str, what: str) -> str:
    """`value` as text for a name field (a model or dataset name), or a TunewiseError naming the field."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TunewiseError(f"{dotted}: {LABELS.get(dotted, dotted)} must be text ({what}), got {_short(value)}",
                            field=dotted)
    return value.strip()


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, (list, tuple)) and not value)


def _whole(value: Any) -> Any:
    """Gradio Numbers arrive as floats (3.0): give the plan an int when the value is whole."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def plan_from_widgets(values: Mapping[str, Any], base: Plan | None = None) -> Plan:
    """The plan the page describes. `values` maps widget names (`PLAN_WIDGETS`) to what the widgets hold;
    missing names keep `base`'s setting (default: `Plan()`). Raises `PlanError` naming the setting."""
    unknown = sorted(set(values) - set(PLAN_WIDGETS))
    if unknown:
        raise PlanError(unknown[0], f"is not a wizard field; known: {', '.join(PLAN_WIDGETS)}")
    overrides: dict[str, Any] = {}
    base = base or Plan()
    for name, value in values.items():
        dotted = PLAN_WIDGETS[name]
        if name in NUMBER_TEXT_WIDGETS and isinstance(value, str):
            value = _number_from_text(value, dotted)
        if name in NUMBER_LIMITS:
            problem = number_problem(value, *NUMBER_LIMITS[name])
            if problem:
                raise PlanError(dotted, f"{problem} ({LABELS.get(dotted, name)})")
        if name in TEXT_WIDGETS:
            text_value(value, dotted, TEXT_WIDGETS[name])
        if name == "goal":
            goal = str(value or "sft")
            if goal.startswith("pipeline:"):
                overrides["pipeline"] = goal.split(":", 1)[1]
                overrides["stage"] = "sft"
            else:
                overrides["pipeline"] = "none"
                overrides["stage"] = goal
            continue
        if name == "gpu":
            if _blank(value) or value == NO_GPU:
                overrides["hardware.device"] = "cpu"
                overrides["hardware.gpu"] = None
                continue
            # A GPU: "auto", or the device a loaded plan names (cuda) when it is not the CPU.
            overrides["hardware.device"] = base.hardware.device if base.hardware.device != "cpu" else "auto"
        if name == "max_steps" and (_blank(value) or value == 0):
            # 0 or empty: run the epochs. with_overrides skips None, so clear it explicitly below.
            overrides[dotted] = _CLEAR
            continue
        if name in OPTIONAL_WIDGETS and _blank(value):
            overrides[dotted] = _CLEAR
            continue
        if _blank(value):
            label = LABELS.get(dotted, name)
            raise PlanError(dotted, f"{label} is empty: fill it in (or press Recommend again)")
        if name == "lora_targets" and isinstance(value, (list, tuple)):
            value = tuple(str(v) for v in value)
        if name == "model" and isinstance(value, str):
            value = value.strip()
        overrides[dotted] = _whole(value)
    data = base.to_dict()
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = None if value is _CLEAR else value
    plan = Plan.from_dict(data)
    if plan.hardware.gpu is None:
        # Without a GPU the plan runs on the CPU: one process on one machine, no sharding.
        if plan.hardware.num_gpus != 1 or plan.hardware.num_nodes != 1 or plan.hardware.shard != "none":
            plan = plan.with_overrides({"hardware.num_gpus": 1, "hardware.num_nodes": 1, "hardware.shard": "none",
                                        "hardware.cpu_offload": False})
    return plan


class _Clear:
    """Marker: set this plan setting to None."""


_CLEAR = _Clear()


def widgets_from_plan(plan: Plan) -> dict[str, Any]:
    """The widget values that show `plan` (the inverse of `plan_from_widgets`)."""
    data = plan.to_dict()
    values: dict[str, Any] = {}
    for name, dotted in PLAN_WIDGETS.items():
        if name == "goal":
            values[name] = plan.stage if plan.pipeline == "none" else f"pipeline:{plan.pipeline}"
            continue
        node: Any = data
        for part in dotted.split("."):
            node = node[part]
        if name == "gpu" and node is None:
            # No GPU named: "auto" (or cuda) means this machine's GPU when it has one, "cpu" the CPU.
            node = NO_GPU if plan.hardware.device == "cpu" else default_hardware()[0]
        if name == "lora_targets":
            node = list(node)
        if name in NUMBER_TEXT_WIDGETS:
            node = "" if node is None else (f"{node:g}" if isinstance(node, float) else str(node))
        values[name] = node
    return values


# -- demo mode --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoLimits:
    """What a public demo (a Hugging Face Space, or `--demo-mode`) lets a visitor run."""

    # bench/advice_quality.py: on the demo model, 600 steps of 8 examples (about 1.5 minutes on 2 shared cores)
    # are what full fine-tuning needs to answer the demo's dates right; 40 steps learnt nothing visible.
    max_steps: int = 600
    """Training steps per run at most (longer plans are cut to this); the demo model's default run length."""
    models: tuple[str, ...] = ("demo",)
    """The only models that may be trained."""
    keep_runs: int = 8
    """Finished runs kept on disk; older ones are deleted when a new run starts."""
    max_upload_bytes: int = 20_000_000
    """Largest dataset file a visitor may upload."""
    max_pilot_minutes: float = 3.0
    """Longest learning-rate check a visitor may ask for (the default, 10% of a demo run with a 1-minute
    floor, is about a minute)."""


#: The plan step's box for the learning-rate check's budget (the CLI's --budget-minutes).
PILOT_BUDGET_LABEL = "Check budget (minutes)"
#: Six seconds to a week: what a budget in minutes can sensibly be.
PILOT_BUDGET_LIMITS = (0.1, 7 * 24 * 60)


def pilot_budget(value: Any, limits: DemoLimits | None = None) -> float | None:
    """The learning-rate check's budget in minutes from its box: None when empty (the default: a share of the
    planned run's training time), else a number within `PILOT_BUDGET_LIMITS` (and, in the public demo,
    `limits.max_pilot_minutes`); TunewiseError (field "pilot_budget") naming the box otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().replace(",", ""))
        except ValueError:
            raise TunewiseError(f"pilot_budget: {PILOT_BUDGET_LABEL} must be a number of minutes (or empty: 10% of the "
                                f"run's training time), got {_short(value)}", field="pilot_budget") from None
    low, high = PILOT_BUDGET_LIMITS
    if limits is not None:
        high = min(high, limits.max_pilot_minutes)
    problem = number_problem(value, low, high)
    if problem:
        cap = (f"; the public demo checks for at most {_show_number(limits.max_pilot_minutes)} minutes"
               if limits is not None and isinstance(value, (int, float)) and value > high else "")
        raise TunewiseError(f"pilot_budget: {PILOT_BUDGET_LABEL} {problem}{cap}", field="pilot_budget")
    return float(value)


def check_demo_inputs(model: Any, dataset: Any, uploads: Iterable[Any] = ()) -> None:
    """Public demo: refuse server paths. A model must be a catalogue / hub name or a size (not a folder on
    the server), and a dataset a bundled name or one of `uploads`: the files this visitor uploaded through
    the page (another visitor's upload is refused like any other server file)."""
    from advisor.plan import DEMO_DATASETS

    name = text_value(model, "model.name", TEXT_WIDGETS["model"])
    if name and (name.startswith(("/", ".", "~")) or "\\" in name or Path(name).expanduser().is_dir()):
        raise TunewiseError(f"model.name: the public demo does not read folders on the server ({name!r}); pick a "
                            "catalogue model, a hub id (owner/name) or a size like 7B", field="model.name")
    data = text_value(dataset, "data.dataset", TEXT_WIDGETS["dataset"])
    if data and data not in DEMO_DATASETS:
        try:
            mine = {Path(p).resolve() for p in uploads}
            inside = Path(data).resolve() in mine
        except (OSError, ValueError):
            inside = False
        if not inside:
            raise TunewiseError(f"data.dataset: the public demo reads only the bundled datasets "
                                f"({', '.join(BUNDLED_DATASETS)}) or a file you upload, not {data!r}",
                                field="data.dataset")


def apply_demo_limits(plan: Plan, limits: DemoLimits) -> tuple[Plan, list[str]]:
    """The plan a public demo will run, and notes on what was changed. Refuses (TunewiseError naming the
    field) what the demo cannot do; cuts what it can bound (steps)."""
    notes: list[str] = []
    if plan.model.name.strip().lower() not in limits.models:
        raise TunewiseError(
            f"model.name: this public demo trains only the bundled demo model ({', '.join(limits.models)}), "
            f"not {plan.model.name!r}. Pick 'demo' in step 1, or run Tunewise on your own machine "
            "(pip install tunewise; python app.py) to train other models.",
            field="model.name",
        )
    if plan.model.trust_remote_code:
        raise TunewiseError("model.trust_remote_code: the public demo never runs a model's own code; turn it off.",
                            field="model.trust_remote_code")
    if plan.hardware.num_gpus != 1 or plan.hardware.num_nodes != 1 or plan.hardware.shard != "none":
        plan = plan.with_overrides({"hardware.num_gpus": 1, "hardware.num_nodes": 1, "hardware.shard": "none",
                                    "hardware.cpu_offload": False})
        notes.append("the demo trains in one process on the CPU")
    steps = plan.training.max_steps
    if steps is None or steps > limits.max_steps:
        plan = plan.with_overrides({"training.max_steps": limits.max_steps})
        notes.append(f"training.max_steps cut to {limits.max_steps} (the public demo's limit)")
    if plan.output is not None:
        plan = Plan.from_dict({**plan.to_dict(), "output": None})
        notes.append("output kept inside the run directory")
    return plan, notes


def step_cap(max_steps: Any) -> int | None:
    """The "Max steps" box as a cap for the advisor: a whole number of at least 1, else None (run the epochs)."""
    return int(max_steps) if isinstance(max_steps, (int, float)) and not isinstance(max_steps, bool) and max_steps >= 1 else None


def admit_demo_run(plan: Plan, limits: DemoLimits, active: Sequence[Any], own: Sequence[str]) -> tuple[Plan, list[str]]:
    """The plan a public demo will launch, with notes on what its limits changed; TunewiseError (field
    "queue") while a run is going (`active`: the queued or running runs' statuses, `own`: the run ids of
    this visitor). Another visitor's run is only said to exist: no id, no data. Call it under the lock
    that also covers the launch, so two clicks cannot both be admitted."""
    plan, notes = apply_demo_limits(plan, limits)
    from advisor.plan import DEMO_DATASETS

    for dotted, value in (("preference.sft_model", plan.preference.sft_model),
                          ("preference.reward_model", plan.preference.reward_model)):
        if value and value not in own:
            raise TunewiseError(f"{dotted}: the public demo starts a stage only from one of your own runs "
                                f"({', '.join(own) or 'none yet'}), not {value!r}", field=dotted)
    for dotted, value in (("forgetting.original_data", plan.forgetting.original_data),
                          ("forgetting.replay_data", plan.forgetting.replay_data)):
        if value and value not in DEMO_DATASETS:
            raise TunewiseError(f"{dotted}: the public demo reads only the bundled datasets "
                                f"({', '.join(DEMO_DATASETS)}) here, not {value!r}", field=dotted)
    if active:
        current = active[0]
        if current.run_id in own:
            what = (f"your run {current.run_id} is {current.state} (step {current.step}/{current.max_steps or '?'}). "
                    "Watch it in step 4 and launch again when it finishes")
        else:
            what = f"another visitor's run is training (at most {limits.max_steps} steps). Launch again in a few minutes"
        raise TunewiseError(f"queue: the public demo trains one run at a time and {what}; the button will work then.",
                            field="queue")
    return plan, notes


def machine_busy_message(current: Any, plan: Plan) -> str:
    """Why the page refuses a second launch while `current` (a queued or running run's status) trains here."""
    where = f"the {plan.hardware.gpu}" if plan.hardware.gpu else "this machine's CPU"
    return (f"queue: run {current.run_id} is {current.state} (step {current.step}/{current.max_steps or '?'}) on this "
            f"machine; a second run on {where} would run both out of memory, or each at half speed. Wait for it to "
            "finish, or stop it in step 4, then launch again (from a terminal, `tunewise launch` can still start runs "
            "side by side on separate GPUs, e.g. with CUDA_VISIBLE_DEVICES)")


def hide_server_paths(text: str, roots: Iterable[Path]) -> str:
    """`text` with every path under one of `roots` cut to its last part (`/srv/runs/_uploads/x/a.jsonl` ->
    `a.jsonl`): what a public demo's visitors see of the server's folders."""
    for root in roots:
        for form in sorted({str(root).rstrip("/"), str(Path(root).resolve()).rstrip("/")}, key=len, reverse=True):
            if form:
                text = re.sub(re.escape(form) + r"(?![\w-])(?:/[^\s'\"`/]+)*/?",
                              lambda match: match.group(0).rstrip("/").rsplit("/", 1)[-1], text)
    return text


# -- the "Show as YAML / CLI" text --------------------------------------------------------------


def plan_yaml(plan: Plan) -> str:
    """The plan file the CLI takes (`tunewise train plan.yaml`)."""
    return plan.to_yaml()


def train_command(plan: Plan, plan_file: str = "plan.yaml", runs_dir: str | None = None) -> str:
    """The exact commands that run this plan from a terminal.

    Every setting that differs from the defaults goes on one `tunewise train ...` line, as its flag
    (advisor.plan.settings()); settings no flag can carry (no flag, or None where the default is not)
    are named, and the plan-file form is given too.
    """
    from advisor.cli import flag_argv

    default = Plan()
    always = ("model.name", "data.dataset", "method.method")  # say what runs, even when it is the default
    parts = ["tunewise", "train"]
    missing = []
    for setting in settings():
        value = setting.value(plan)
        if value == setting.value(default) and setting.dotted not in always:
            continue
        argv = flag_argv(setting, value) if setting.flag else []
        if not argv:
            missing.append(setting.dotted)
        parts += argv
    extra = ["--runs-dir", runs_dir] if runs_dir else []
    lines = ["# one line, with the settings that differ from the defaults:", shlex.join(parts + extra)]
    if missing:
        lines.append(f"# (only the plan file carries: {', '.join(missing)})")
    lines += ["", f"# or save the plan below as {plan_file} and run it:",
              shlex.join(["tunewise", "train", plan_file] + extra),
              "# (tunewise launch ... runs it in the background instead)"]
    return "\n".join(lines)


# -- table rows ----------------------------------------------------------------------------------


def gb(num_bytes: float | int | None, digits: int = 2) -> str:
    """Bytes as a GB string ("12.34"), "-" for None."""
    if num_bytes is None:
        return "-"
    return f"{num_bytes / GB:.{digits}f}"


def human_count(count: int | None) -> str:
    """1234567 -> "1.23M", 7.2e9 -> "7.24B"."""
    if count is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


METHOD_LABELS = {"full": "Full", "lora": "LoRA", "qlora": "QLoRA"}


def memory_rows(estimates: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the memory table: one row per component, one column per method, in GB.

    `estimates` maps a method label ("Full", "LoRA", "QLoRA") to an `advisor.memory.MemoryEstimate`.
    """
    methods = list(estimates)
    by_method = {m: dict(estimates[m].components) for m in methods}
    components: list[str] = []
    for parts in by_method.values():
        for name in parts:
            if name not in components:
                components.append(name)
    # Small models (the demo) read better in MB: the unit follows the largest total.
    unit, scale = ("GB", GB) if max(estimates[m].total_bytes for m in methods) >= GB else ("MB", 1e6)

    def show(num_bytes: int) -> str:
        return f"{num_bytes / scale:.2f}"

    rows = []
    for name in components:
        rows.append([name.replace("_", " ")] + [show(by_method[m].get(name, 0)) for m in methods])
    rows.append(["peak allocated"] + [show(estimates[m].peak_allocated_bytes) for m in methods])
    rows.append(["total on the GPU"] + [show(estimates[m].total_bytes) for m in methods])
    return [f"component ({unit} per GPU)"] + methods, rows


def explanation_rows(estimate: Any) -> list[list[str]]:
    """[component, how it was computed] for one estimate, then how they combine into the peak."""
    rows = [[name.replace("_", " "), text] for name, text in estimate.explanations.items()]
    rows.append(["peak", estimate.peak_explanation])
    return rows


@dataclass(frozen=True)
class FitRow:
    """One row of the GPU-fit table."""

    gpu: str
    memory_gb: float
    method: str
    fits: bool
    max_micro_batch: int
    max_seq_len: int
    fix: str


def fit_rows(fits: Iterable[FitRow]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) for the GPU-fit table."""
    headers = ["GPU", "GB", "method", "fits", "max micro-batch", "max sequence", "cheapest fix"]
    rows = [[f.gpu, f"{f.memory_gb:g}", f.method, "yes" if f.fits else "no",
             f.max_micro_batch if f.max_micro_batch else "-", f.max_seq_len if f.max_seq_len else "-", f.fix or ""]
            for f in fits]
    return headers, rows


def _display(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "-" if value is None else str(value)


#: Labels of the advised values no plan setting holds (advisor.recommend.INFO_ONLY).
ADVICE_LABELS = {"effective_batch": "Effective batch", "total_steps": "Total steps", "preference_method": "RLHF or DPO"}


def advice_label(name: str) -> str:
    """How the page names advice `name`: its plan setting's label, or ADVICE_LABELS'."""
    if name in ADVICE_LABELS:
        return ADVICE_LABELS[name]
    try:
        return find_setting(name).label
    except KeyError:
        return name.replace("_", " ")


def recommendation_rows(advice: Mapping[str, Any], current: Mapping[str, Any] | None = None) -> list[list[str]]:
    """[setting, value, why] per recommended value that applies. `advice` maps an advisor name (which is
    the widget name for the settings the page edits) to an Advice (value, reason, rule, overridden). When
    the page's current value (`current`, by widget name) differs from the advice, the row shows yours,
    marked "set by you", with the recommendation beside it."""
    rows = []
    current = current or {}
    for name, item in advice.items():
        value = getattr(item, "value", item)
        if value is None:
            continue  # does not apply to this plan (e.g. a LoRA rank for full fine-tuning)
        reason = getattr(item, "reason", "") or ""
        overridden = bool(getattr(item, "overridden", False))
        shown = value
        if name in current and name in PLAN_WIDGETS and not _same(current[name], value):
            shown, overridden = current[name], True
        label = advice_label(name)
        if overridden and not _same(shown, value):
            why = f"set by you (recommended {_display(value)}: {reason})"
        elif overridden:
            why = f"set by you: {reason}" if reason and not reason.startswith("set by you") else "set by you"
        else:
            why = reason
        rows.append([label, _display(shown), why])
    return rows


def _as_number(value: Any) -> Any:
    """An optional number's text box holds text ("100"): the number it says, else the value itself."""
    if isinstance(value, str):
        try:
            return float(value.strip().replace(",", ""))
        except ValueError:
            return value
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a or []) == list(b or [])
    if isinstance(a, str) != isinstance(b, str) and (a not in (None, "") and b not in (None, "")):
        a, b = _as_number(a), _as_number(b)  # a text box's "100" is the advised 100
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(float(a) - float(b)) <= 1e-12 + 1e-9 * abs(float(b))
    if a in (None, "") and b in (None, ""):
        return True
    return a == b


def profile_rows(profile: Any) -> list[list[str]]:
    """[what, value] rows summarising a DatasetProfile for the page."""
    tokens = profile.tokens
    count_kind = "exact" if profile.tokens_exact else "approximate"
    rows = [
        ["format", profile.format],
        ["examples", f"{profile.examples:,}"],
        ["tokens per example (p50 / p95 / max)", f"{tokens.p50} / {tokens.p95} / {tokens.max} ({count_kind})"],
        ["total tokens", human_count(profile.estimated_total_tokens)],
        ["recommended sequence length", f"{profile.recommended_seq_len} ({profile.truncated_share:.1%} truncated)"],
        ["packing", ("yes: " if profile.pack else "no: ") + profile.pack_reason],
        ["token counts", profile.tokenizer],
    ]
    rows += [["warning", w] for w in profile.warnings]
    return rows


def model_card_markdown(spec: Any, counts: Any) -> str:
    """Step 1's model card: parameters, architecture and the config numbers the planner uses."""
    kind = f"{spec.model_type}" + (f", mixture of {spec.num_experts} experts ({spec.experts_per_token} per token)"
                                   if spec.num_experts else "")
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


def run_row(status: Any) -> list[Any]:
    """One row of the run history from a trainer.status.RunStatus (columns: RUN_HEADERS, key ones first)."""
    import time

    state = status.state
    if state == "failed" and status.signal:
        state = f"failed (signal {status.signal})"
    elif state == "failed" and status.exit_code not in (None, 0):
        state = f"failed (exit {status.exit_code})"
    step, loss, forgetting = status.step or 0, status.last_loss, status.forgetting_pct
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(status.created_at)) if status.created_at else ""
    return [
        status.run_id,
        state,
        (f"{step}/{status.max_steps}" if status.max_steps else str(step))
        + (f" (best {status.best_step})" if getattr(status, "best_step", None) is not None else ""),
        f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
        f"{round(forgetting, 1) + 0.0:+.1f}%" if isinstance(forgetting, (int, float)) else "-",  # no "-0.0%"
        memory_cell(getattr(status, "memory_estimate_bytes", None), getattr(status, "memory_measured_bytes", None)),
        started,
        run_what(status),
        run_labels(status),
    ]


def run_labels(status: Any) -> str:
    """The history's "name / tags" cell: the user's name for the run and its tags ("lr sweep #baseline #r16")."""
    name = getattr(status, "name", None) or ""
    tags = " ".join(f"#{tag}" for tag in getattr(status, "tags", ()) or ())
    return " ".join(part for part in (name, tags) if part) or "-"


#: The run history's columns: what a practitioner scans first (state, progress, loss), then the long text.
#: "memory" keeps the plan's estimate beside the measured peak (GPU tensors, or host RAM on the CPU).
RUN_HEADERS = ["run", "status", "step", "last loss", "forgetting", "memory (estimate / measured)", "started", "what",
               "name / tags"]


def memory_cell(estimate: int | None, measured: int | None) -> str:
    """The run history's memory column: "estimate / measured unit (error %)", the error being (estimate -
    measured) / measured; a dash for what a run does not have (an old run, no log yet)."""
    if not estimate and not measured:
        return "-"
    largest = max(estimate or 0, measured or 0)
    unit, scale = ("GB", 1e9) if largest >= 1e9 else ("MB", 1e6)
    shown = [f"{value / scale:.2f}" if value else "-" for value in (estimate, measured)]
    error = f" ({100.0 * (estimate - measured) / measured:+.0f}%)" if estimate and measured else ""
    return f"{shown[0]} / {shown[1]} {unit}{error}"

#: The history's filters: "all", or one value (trainer.supervisor.filter_runs reads them).
ALL = "all"
STAGE_FILTERS = (ALL, "sft", "rm", "dpo", "ppo", "pipeline:rlhf", "pipeline:dpo", "pipeline:compare")
STATE_FILTERS = (ALL, "queued", "running", "finished", "failed", "stopped")


def history_filter(value: Any) -> str | None:
    """A history filter's value for trainer.supervisor.filter_runs: None for "all" or nothing."""
    return None if _blank(value) or value == ALL else str(value)


def preselected_run(statuses: Sequence[Any]) -> str | None:
    """The run step 5 opens on: the newest that did not fail (a failed run has nothing to show), else None."""
    return next((status.run_id for status in statuses if status.state != "failed"), None)


#: File suffixes of the dataset formats Tunewise reads.
DATA_SUFFIXES = tuple(SUFFIX_FORMATS)


def dataset_label(dataset: Any) -> str:
    """How the page names a dataset: a bundled name or a hub id as it is, a file by its name alone (the
    page never shows where a file lies on the server)."""
    if not isinstance(dataset, str):
        return ""
    name = dataset.strip()
    path_like = (name.startswith(("/", ".", "~")) or "\\" in name
                 or PurePath(name).suffix.lower() in DATA_SUFFIXES)
    return PurePath(name.replace("\\", "/")).name if path_like and name not in BUNDLED_DATASETS else name


def run_what(status: Any) -> str:
    """The history's one-line description of a run (a RunStatus): stage or pipeline, method, model, and
    the dataset named by `dataset_label` (so no server path reaches the page)."""
    if status.stage is None:
        return status.summary or "(plan unreadable)"
    what = status.stage if status.pipeline in (None, "none") else f"{status.pipeline} pipeline"
    if (status.summary or "").startswith("learning-rate pilot"):  # trainer/pilot.py: a rate search, not a training run
        what = f"learning-rate pilot of {what}"
    return f"{what} {status.method} on {status.model} with {dataset_label(status.dataset)}"


# -- menus ------------------------------------------------------------------------------------------------

#: Bundled datasets offered in the dataset menu (name -> what it is).
BUNDLED_DATASETS = {
    "demo-sft": "dates written out (chat SFT)",
    "demo-preference": "dates, chosen vs rejected (DPO / reward model)",
}


#: The bare sizes the model menu offers (advisor.specs plans any such size as a Llama-shaped model).
ROUGH_SIZES = ("1B", "3B", "7B", "8B", "13B", "34B", "70B")


def model_choices() -> list[tuple[str, str]]:
    """(label, value) for the model menu: the bundled demo model, then the catalogue."""
    from advisor import specs

    # The rough sizes come before the catalogue, so typing "7B" and Enter picks the size (the filter takes the
    # first match), not the first catalogue model whose name contains 7b.
    sizes = [(f"{size}: any Llama-shaped model of this size (rough)", size) for size in ROUGH_SIZES]
    return [("demo (bundled offline model)", "demo"), *sizes] + [(name, name) for name in specs.catalogue_names()]


def gpu_choices() -> list[tuple[str, str]]:
    """(label, value) for the GPU menu: no GPU first, then the known GPUs with their memory."""
    from advisor import gpus

    return [("No GPU: demo on the CPU", NO_GPU)] + [(f"{g.name} ({g.memory_gb:.0f} GB)", g.name) for g in gpus.GPUS]


def default_hardware(found: Sequence[tuple[str, int | None]] | None = None) -> tuple[str, int]:
    """Step 1's GPU and GPU count before the user picks: the GPUs this machine has (`gpus.local_gpus`, or
    `found`), the most common type among them and how many of it, so that a plan made on a GPU box trains on
    its GPUs by default; "No GPU" and 1 on a machine without one, or with a card the catalogue lacks (its
    memory goes in Advanced settings)."""
    from advisor import gpus

    found = gpus.local_gpus() if found is None else found
    matched = [gpus.match_gpu(name, mib) for name, mib in found]
    kinds = [gpu.name for gpu in matched if gpu is not None]
    if not kinds:
        return NO_GPU, 1
    common = max(dict.fromkeys(kinds), key=kinds.count)
    return common, kinds.count(common)


def dataset_choices() -> list[tuple[str, str]]:
    """(label, value) for the dataset menu."""
    return [(f"{name}: {what}", name) for name, what in BUNDLED_DATASETS.items()]


def model_summary(name: Any):
    """(ModelSpec, ParamCounts) of a model name (ModelNotFound names the fix)."""
    from advisor import specs

    spec = specs.resolve_model(text_value(name, "model.name", TEXT_WIDGETS["model"]))
    return spec, specs.param_counts(spec)


# -- the advice step ------------------------------------------------------------------------------------

#: The plan widgets the advisor fills in, in its order (the others come from steps 1 and 2 or keep their
#: values); packing comes with the dataset profile.
ADVISED_WIDGETS = tuple(name for name in ADVICE if name in PLAN_WIDGETS) + ("packing",)

#: What the advice depends on: the plan widgets of steps 1 and 2, and the step-2 widgets that are advisor
#: inputs, not plan settings (task, domain, priority, quantized_inference).
ADVISOR_WIDGETS = ("model", "dataset", "goal", "gpu", "num_gpus", "num_nodes", "task", "domain", "priority",
                   "quantized_inference", "original_data")


#: What a browser keeps of the wizard across a reload (gr.BrowserState): every widget steps 1 to 3 read.
SAVED_WIDGETS = tuple(dict.fromkeys((*ADVISOR_WIDGETS, *PLAN_WIDGETS)))
#: Bumped when what is saved changes meaning; an older record is ignored (the page starts fresh).
SESSION_VERSION = 1


# -- the step bar: which steps a click may reach, and what Next would check on the way ----------------------

#: The wizard's steps by number, as the step bar names them.
STEPS = {1: "Model & hardware", 2: "Data & goal", 3: "Plan", 4: "Launch & monitor", 5: "Results & runs"}
#: Results & runs (the history) is open from every step, as step 1's "Run history" button is.
ALWAYS_OPEN_STEP = 5


def _step_number(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5 else default


def furthest_step(step: int, furthest: int = 1) -> int:
    """The furthest of steps 1 to 4 reached once the page is on `step` (the history, step 5, is open from
    anywhere and does not open the steps before it)."""
    step, furthest = _step_number(step, 1), _step_number(furthest, 1)
    return max(min(furthest, 4), step if step != ALWAYS_OPEN_STEP else 1)


def saved_step(saved: Any) -> tuple[int, int]:
    """The step a browser's record is on and the furthest step it reached (1, 1 for no usable record).
    (Unsigned: a forged step only opens steps on that browser's own page, and leaving step 1 or 2 forward
    still runs Next's checks, see `checks_on_the_way`.)"""
    if not isinstance(saved, Mapping):
        return 1, 1
    step = _step_number(saved.get("step"), 1)
    return step, furthest_step(step, _step_number(saved.get("furthest"), 1))


def open_steps(at: int, furthest: int) -> tuple[int, ...]:
    """The steps the step bar lets a click reach from `at`: every step up to the furthest reached, and the
    history. Gradio's own stepper allows only steps before the current one; going back to change the data
    and then forward to the plan again is the common path."""
    top = furthest_step(at, furthest)
    return tuple(step for step in STEPS if step <= top or step == ALWAYS_OPEN_STEP)


def checks_on_the_way(at: int, target: int) -> tuple[str, ...]:
    """What the page checks when the step bar goes from step `at` to `target`, as Next would: "model" to go
    past step 1, "data" to go past step 2 (and the plan is then advised for them). Going back checks nothing,
    nor does moving between the plan and the monitor, nor opening the history; coming from the history
    (where step 1's model may have been changed on the way) checks what the target step builds on."""
    if target == ALWAYS_OPEN_STEP or (target <= at != ALWAYS_OPEN_STEP) or (at in (3, 4) and target in (3, 4)):
        return ()
    return tuple(check for past, check in ((1, "model"), (2, "data")) if target > past)


def step_bar_label(step: int) -> str:
    return f"{step} · {STEPS[step]}"


def _json_safe(value: Any) -> Any:
    """A widget value as the browser may keep it (JSON scalars, or a list of strings); else None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if not isinstance(value, float) or math.isfinite(value) else None
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    return None


def _mac(signed: Mapping[str, Any], secret: bytes) -> str:
    return hmac.new(secret, json.dumps(signed, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def session_record(values: Mapping[str, Any], changed: Iterable[str], step: int, secret: bytes, *,
                   own: Sequence[str] = (), uploads: Mapping[str, str] | None = None, run_id: str | None = None,
                   furthest: int = 1) -> dict:
    """What the browser keeps so that a reload finds the wizard as it was: the widgets' values, which of the
    advised ones are the user's own (`changed`: re-advised as "set by you"), the step and the furthest step
    reached (`furthest_step`), and, signed with the server's `secret` (the browser can read it but not forge
    it), the runs this session launched, its uploads by name (the public demo's ownership) and the run it
    watches."""
    signed = {"own": [str(run) for run in own], "uploads": {str(k): str(v) for k, v in (uploads or {}).items()},
              "run_id": run_id}
    return {"version": SESSION_VERSION, "step": int(step), "furthest": furthest_step(step, furthest),
            "values": {name: _json_safe(values[name]) for name in SAVED_WIDGETS if name in values},
            "changed": sorted(name for name in changed if name in ADVISED_WIDGETS), **signed, "mac": _mac(signed, secret)}


@dataclass(frozen=True)
class Restored:
    """A browser's saved wizard, checked (see `restore_session`)."""

    values: dict
    changed: tuple
    step: int
    own: tuple = ()
    uploads: dict | None = None
    run_id: str | None = None
    trusted: bool = False
    """Whether the signed part (own runs, uploads, watched run) verified; False: only the values are used."""
    furthest: int = 1
    """The furthest of steps 1 to 4 reached (the step bar lets the user jump back to it)."""


def restore_session(saved: Any, secret: bytes) -> Restored | None:
    """The wizard a browser saved, or None when there is nothing usable (no record, another version). Values
    keep only known widgets with JSON-safe values; the signed part counts only when its signature verifies
    with this server's `secret` (an edited record keeps its values but owns no run and no upload)."""
    if not isinstance(saved, Mapping) or saved.get("version") != SESSION_VERSION or not isinstance(saved.get("values"), Mapping):
        return None
    values = {name: _json_safe(value) for name, value in saved["values"].items() if name in SAVED_WIDGETS}
    changed = tuple(name for name in saved.get("changed") or () if name in ADVISED_WIDGETS and name in values)
    step, furthest = saved_step(saved)
    signed = {key: saved.get(key) for key in ("own", "uploads", "run_id")}
    mac = saved.get("mac")
    trusted = isinstance(mac, str) and hmac.compare_digest(mac, _mac(signed, secret))
    if not trusted:
        return Restored(values, changed, min(step, 3), furthest=min(furthest, 3))
    return Restored(values, changed, step, tuple(signed["own"] or ()), dict(signed["uploads"] or {}),
                    signed["run_id"], True, furthest)


@dataclass(frozen=True)
class Advised:
    """What the plan step shows after asking the advisor."""

    plan: Plan
    """The recommended plan (with the page's choices of model, data, goal and hardware)."""
    values: dict
    """Advice by advisor name (recommend.PLAN_FIELDS keys) -> Advice."""
    target_choices: list
    """Module names offered for LoRA targets (the architecture's real linear layers)."""
    notes_markdown: str
    """Memory verdict, warnings and notes as markdown."""


#: Plan widgets that other advised values follow: editing one re-advises the rest (keeping the user's own
#: changes), so LoRA alpha and its reason follow a new rank, and the learning rate follows a new method.
FOLLOWED_WIDGETS = ("method", "lora_rank")


def user_changes(values: Mapping[str, Any], advice: Mapping[str, Any] | None) -> dict:
    """The advised widgets (`ADVISED_WIDGETS`) whose page value is the user's own: it differs from the last
    advice, or that advice already kept it as "set by you". Re-advising keeps these and re-derives the rest,
    so a value that follows another (alpha from the rank, the rate from the method) follows the user's edit
    instead of staying at what was advised for the old one."""
    advice = advice or {}
    changed = {}
    for name in ADVISED_WIDGETS:
        if name not in values:
            continue
        item = advice.get(name)
        if item is None or getattr(item, "value", item) is None:
            continue  # not advised (packing comes with the profile; a rank for full fine-tuning): nothing to compare
        if getattr(item, "overridden", False) or not _same(values[name], getattr(item, "value", item)):
            changed[name] = values[name]
    return changed


def advise(values: Mapping[str, Any], profile: Mapping[str, Any] | None = None,
           overrides: Mapping[str, Any] | None = None, max_steps: int | None = None,
           measured_lr: Mapping[str, Any] | None = None) -> Advised:
    """Ask the advisor for the page's model, data, goal and hardware (`values` by widget name: model,
    dataset, goal, gpu, num_gpus, num_nodes, task, domain, priority, quantized_inference). `profile` is the dataset
    profile's dict when known; `overrides` (widget name -> value) are kept as "set by you"; `measured_lr`
    ({"rate", "reason"}, a pilot's result) replaces the learning-rate rules."""
    from advisor import recommend as rec_mod
    from advisor import specs

    goal = str(values.get("goal") or "sft")
    stage, pipeline = ("sft", goal.split(":", 1)[1]) if goal.startswith("pipeline:") else (goal, "none")
    gpu = values.get("gpu")
    gpu = None if _blank(gpu) or gpu == NO_GPU else str(gpu)
    examples = int(profile["examples"]) if profile and profile.get("examples") else 1000
    tokens = None
    if profile and profile.get("tokens", {}).get("estimated_total"):
        tokens = int(profile["tokens"]["estimated_total"]) or None
    seq_len = int(profile["recommended_seq_len"]) if profile and profile.get("recommended_seq_len") else None
    completion = (profile or {}).get("tokens", {}).get("estimated_completion") or None
    inputs = rec_mod.AdvisorInputs(
        model=str(values.get("model") or "demo").strip(),
        examples=examples,
        tokens=tokens,
        task=str(values.get("task") or "instruction"),
        domain_shift=str(values.get("domain") or "medium"),
        gpu=gpu,
        num_gpus=int(_whole(values.get("num_gpus") or 1)) if gpu else 1,
        num_nodes=int(_whole(values.get("num_nodes") or 1)) if gpu else 1,
        priority=str(values.get("priority") or "balanced"),
        quantized_inference=bool(values.get("quantized_inference")),
        stage=stage,
        pipeline=pipeline,
        seq_len=seq_len,
        max_steps=int(_whole(max_steps)) if not _blank(max_steps) and _whole(max_steps) else None,
        completion_tokens=int(completion) if completion else None,
        dataset=None if _blank(values.get("dataset")) else str(values["dataset"]).strip(),
        measured_lr=float(measured_lr["rate"]) if measured_lr else None,
        measured_lr_reason=str(measured_lr["reason"]) if measured_lr else None,
        measured_lr_method=str(measured_lr["method"]) if measured_lr and measured_lr.get("method") else None,
        original_data=None if _blank(values.get("original_data")) else str(values["original_data"]).strip(),
    )
    kept = {}
    for name, value in (overrides or {}).items():
        if name in rec_mod.PLAN_FIELDS and name in ADVISED_WIDGETS and not _blank(value):
            kept[name] = tuple(value) if isinstance(value, list) else _whole(value)
    recommendation = rec_mod.recommend(inputs, kept or None)
    base = Plan()
    if not _blank(values.get("dataset")):
        base = base.with_overrides({"data.dataset": str(values["dataset"])})
    if inputs.original_data:
        base = base.with_overrides({"forgetting.original_data": inputs.original_data})
    if profile and "pack" in profile:
        base = base.with_overrides({"data.packing": bool(profile["pack"])})
    if max_steps:
        base = base.with_overrides({"training.max_steps": max_steps})
    plan = recommendation.to_plan(base, allow_unfit=True)
    if gpu is None:
        plan = plan.with_overrides({"hardware.device": "cpu"})
    spec = specs.resolve_model(inputs.model)
    choices: list[str] = []
    for names in specs.target_module_sets(spec).values():
        for module in names:
            if module not in choices:
                choices.append(module)
    for module in specs.linear_layers(spec):
        if module not in choices:
            choices.append(module)
    if "all-linear" not in choices:
        choices.append("all-linear")
    return Advised(plan, dict(recommendation.values), choices, notes_markdown(recommendation))


def notes_markdown(recommendation: Any) -> str:
    """The advisor's memory verdict, warnings and notes, as markdown for the plan step."""
    lines = []
    memory = recommendation.memory
    if memory.checked:
        if memory.fits:
            lines.append(f"**Fits** {memory.gpu}: about {gb(memory.total_bytes)} GB per GPU for the recommended setup"
                         + (f", up to micro-batch {memory.max_micro_batch}." if memory.max_micro_batch else "."))
        else:
            lines.append(f"**Does not fit** {memory.gpu}: needs {gb(memory.total_bytes)} GB per GPU. "
                         + ("Closest fixes: " + "; ".join(memory.fixes) if memory.fixes else ""))
    else:
        lines.append(f"No GPU chosen: about {gb(memory.total_bytes)} GB for the recommended setup (not checked "
                     "against a card; pick one in step 1 to size the plan for it).")
    for warning in recommendation.warnings:
        lines.append(f"- **Warning:** {warning}")
    for note in recommendation.notes:
        lines.append(f"- {note}")
    return "\n".join(lines)


# -- the plan step's memory and fit ---------------------------------------------------------------------


@dataclass(frozen=True)
class PlanView:
    """Everything the plan step shows about a plan's memory."""

    memory: tuple[list[str], list[list[Any]]]
    """(headers, rows) of the Full / LoRA / QLoRA memory table."""
    stacked: dict[str, dict[str, int]]
    """Method label -> component -> bytes, for the stacked-bar chart."""
    gpu_bytes: int | None
    """The chosen GPU's memory (None: no GPU chosen)."""
    gpu_label: str
    """The chosen GPU in words."""
    fit: tuple[list[str], list[list[Any]]]
    """(headers, rows) of the GPU-fit table: the plan's setup on every known GPU."""
    status_markdown: str
    """One paragraph: what the plan needs and whether it fits the chosen GPU, or the cheapest fix."""
    explanations: list[list[str]]
    """How each component of the plan's own method was computed."""
    chart_title: str = "Memory per GPU by component"
    """The chart's title: per GPU, or (no GPU chosen) the tensors in host memory."""


def plan_view(plan: Plan, measured_lr: float | None = None) -> PlanView:
    """Memory of `plan` for full / LoRA / QLoRA, and how the plan's own setup fits every known GPU
    (`measured_lr`: the rate the pilot measured on this data, which the status does not question)."""
    import dataclasses

    from advisor import gpus, memory, specs

    from advisor.plan import PIPELINE_PEAK_STAGE

    spec = specs.resolve_model(plan.model.name)
    specs.check_seq_len(spec, plan.training.seq_len, plan.training.rope_scaling, plan.training.rope_factor)
    params = None if spec.rough else specs.param_counts(spec).total
    setup = memory.setup_from_plan(plan)
    peak_stage = PIPELINE_PEAK_STAGE.get(plan.pipeline)
    if peak_stage:  # a pipeline is sized by its heaviest step, as the advice is
        setup = dataclasses.replace(setup, stage=peak_stage)
    estimates = {}
    for method, label in METHOD_LABELS.items():
        changes: dict[str, Any] = {"method": method}
        if method == "qlora" and setup.precision == "fp32":
            changes["precision"] = "bf16"  # QLoRA computes in 16 bit
        if method == "qlora" and setup.stage == "ppo":
            continue  # the plan refuses QLoRA for PPO
        estimates[label] = memory.estimate(spec, dataclasses.replace(setup, **changes))
    own = memory.estimate(spec, setup)
    gpu = gpus.get_gpu(plan.hardware.gpu) if plan.hardware.gpu else None
    if gpu is None and plan.hardware.gpu_memory_gb:
        gpu = gpus.custom_gpu(plan.hardware.gpu_memory_gb)
    rows = []
    chosen_fit = None
    for card in gpus.GPUS + ((gpu,) if gpu is not None and gpu not in gpus.GPUS else ()):
        fit = memory.gpu_fit(spec, setup, int(card.memory_bytes))
        if gpu is not None and card.name == gpu.name:
            chosen_fit = fit
        rows.append(FitRow(card.name + (" (yours)" if gpu is not None and card.name == gpu.name else ""),
                           round(card.memory_bytes / GB, 1), METHOD_LABELS[setup.method], fit.fits,
                           fit.max_micro_batch, fit.max_seq_len, fit.cheapest_fix or ""))
    hw = plan.hardware
    sharding = {"none": "each holding a whole copy (DDP)", "zero2": "optimizer and gradients sharded (ZeRO-2)",
                "zero3": "everything sharded (ZeRO-3 / FSDP)"}.get(hw.shard, hw.shard)
    if hw.num_nodes > 1:
        per_gpu = f" per GPU ({hw.num_nodes} nodes x {hw.num_gpus} GPUs, {sharding})"
    else:
        per_gpu = f" per GPU ({hw.num_gpus} GPUs, {sharding})" if hw.num_gpus > 1 else ""
    step = f", sized by its heaviest step, {peak_stage.upper()}" if peak_stage else ""
    need = (f"This plan ({METHOD_LABELS[setup.method]}, micro-batch {setup.micro_batch} x {setup.seq_len} tokens{step}) "
            f"needs **{gb(own.total_bytes)} GB**{per_gpu} on a GPU: {gb(own.peak_allocated_bytes)} GB of tensors at the "
            f"peak, plus the CUDA context and allocator slack"
            + (" (on this CPU the tensors live in host memory, and there is no CUDA context)." if hw.gpu is None
               else "."))
    if gpu is None:
        verdict = " No GPU chosen: it trains on the CPU here (the table below shows which GPUs would fit it)."
    elif chosen_fit.fits:
        verdict = (f" **It fits your {gpu.name}** ({gb(gpu.memory_bytes, 0)} GB) with {gb(chosen_fit.headroom_bytes)} GB "
                   f"to spare; the largest micro-batch is {chosen_fit.max_micro_batch}.")
    else:
        verdict = (f" **It does not fit your {gpu.name}** ({gb(gpu.memory_bytes, 0)} GB). "
                   + (chosen_fit.cheapest_fix or "Choose a larger GPU or a smaller model."))
    if hw.num_nodes > 1:
        verdict += " " + cluster_markdown(spec, setup, gpu)
    if own.rough or spec.rough:
        verdict += " *(Rough mode: the model's shape is guessed from its size.)*"
    return PlanView(
        memory=memory_rows(estimates),
        # No GPU: the chart shows the tensors a step holds (in host memory here), not a CUDA context that a
        # CPU does not have; the GPU total is in the table and the status.
        stacked={label: _stack(est, on_gpu=hw.gpu is not None) for label, est in estimates.items()},
        chart_title=("Memory per GPU by component" if hw.gpu is not None else
                     "Tensors at the peak by component (no GPU: in host memory)"),
        gpu_bytes=int(gpu.memory_bytes) if gpu is not None else None,
        gpu_label=gpu.name if gpu is not None else "",
        fit=fit_rows(rows),
        status_markdown=need + verdict + estimate_markdown(plan, spec, setup, own)
        + "".join(f"\n\n**Check this:** {w}" for w in plausibility_warnings(plan, params, measured_lr)),
        explanations=explanation_rows(own),
    )


def estimate_markdown(plan: Plan, spec: Any, setup: Any, own: Any) -> str:
    """What the plan step adds about its own estimate, in the words `tunewise plan` uses: the phase of the step
    that sets the peak, the estimator's warnings (an MoE model under QLoRA: which weights stay 16-bit, what
    QLoRA saves there, what to do instead), and the host RAM per node (checked against this machine's RAM when
    the plan trains here, on its CPU)."""
    from advisor import gpus, memory, specs

    text = (f"\n\nThe peak comes in the **{own.peak_phase.replace('_', ' ')}** phase of a step "
            f"({own.phase_explanations[own.peak_phase]}).")
    for warning in own.warnings:
        text += f"\n\n**Warning:** {warning}"
    checkpoint = specs.checkpoint_on_disk(plan.model.name)
    mmap, size = (checkpoint[1], checkpoint[0]) if checkpoint else (True, None)
    on_gpu = plan.hardware.gpu is not None or plan.hardware.gpu_memory_gb is not None
    host = memory.host_estimate(spec, setup, on_gpu=on_gpu, mmap=mmap, checkpoint_bytes=size)
    text += f"\n\nHost RAM: about **{gb(host.host_ram_bytes)} GB** per node" + (
        f" ({', '.join(f'{name} {gb(value)}' for name, value in host.components.items())} GB)")
    if not on_gpu:
        ram = gpus.this_machine().ram_bytes
        if ram:
            fit = memory.host_fit(spec, setup, ram, on_gpu=False, mmap=mmap, checkpoint_bytes=size)
            text += (f"; this machine has {gb(ram)} GB." if fit.fits else
                     f"; **this machine has only {gb(ram)} GB**: {fit.cheapest_fix or 'use a machine with more RAM'}.")
    return text + ("." if not text.endswith(".") else "")


def cluster_markdown(spec: Any, setup: Any, gpu: Any = None) -> str:
    """One paragraph for a plan over several nodes: host RAM per node, traffic between nodes, warnings."""
    from advisor import cluster

    found = cluster.cluster_estimate(spec, setup, dense_tflops=getattr(gpu, "dense_tflops", None))
    traffic = found.traffic[setup.shard]
    text = (f"Each node needs about **{gb(found.host_bytes_per_node)} GB of host RAM**; "
            f"{cluster.STRATEGIES[setup.shard]} moves **{gb(traffic.bytes_per_step)} GB** into and out of each node per "
            f"step ({traffic.seconds_per_step:.2f} s at {found.interconnect_gbps:g} Gb/s). Export it as a cluster job "
            "(`tunewise job`).")
    for warning in found.warnings:
        text += f" **Warning:** {warning}."
    return text


#: Learning rates past which a run almost always diverges: the guide's ranges (LoRA 1e-4 to 3e-4, full
#: 1e-5 to 5e-5) times about 30, which also covers the evidence that LoRA's best rate sits ~10x full's.
IMPLAUSIBLE_LR = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2}
#: Sequences per optimizer step past which steps become so few that warmup and the schedule lose meaning.
IMPLAUSIBLE_BATCH = 8192


#: ...or this many times the evidence's rate for the model's size and alpha (advisor.recommend.evidence_learning_rate),
#: where that is higher: the fixed ceilings above were set for 7B-class models, and a small model trains best at
#: far higher rates (Tinker's transfer: LR proportional to 1/sqrt(parameters); the demo model's LoRA rate is 0.028).
IMPLAUSIBLE_OVER_EVIDENCE = 10


def implausible_lr(method: str, params: int | None = None, alpha: float | None = None) -> float:
    """The learning rate above which the plan status says "Check this" for `method` on a `params` model."""
    from advisor.recommend import evidence_learning_rate

    ceiling = IMPLAUSIBLE_LR[method]
    if params:
        evidence = evidence_learning_rate(method, params, None if method == "full" else alpha)[0]
        ceiling = max(ceiling, IMPLAUSIBLE_OVER_EVIDENCE * evidence)
    return ceiling


def plausibility_warnings(plan: Plan, params: int | None = None, measured_lr: float | None = None) -> list[str]:
    """Values the plan accepts (they are in range) but that a practitioner would not mean: said, not refused.
    `params` (the model's parameter count, when known) scales the learning-rate ceiling with the model's size;
    a rate the pilot measured on this data (`measured_lr`) is not questioned."""
    warnings = []
    t, method = plan.training, plan.method.method
    ceiling = implausible_lr(method, params, plan.method.lora_alpha)
    measured = measured_lr is not None and math.isclose(t.learning_rate, measured_lr, rel_tol=1e-6)
    if t.learning_rate > ceiling and not measured:
        usual = "the guide: " + ("1e-5 to 5e-5" if method == "full" else "1e-4 to 3e-4")
        if ceiling > IMPLAUSIBLE_LR[method]:
            usual = f"{ceiling / IMPLAUSIBLE_OVER_EVIDENCE:.1e} is the evidence's rate for this model's size; {usual}"
        warnings.append(f"a learning rate of {t.learning_rate:g} for {METHOD_LABELS[method]} is far above the usual "
                        f"range ({usual}); most runs diverge there. Press Re-advise, or check the rate on your data "
                        "(Check the learning rate on my data) first.")
    gpus = plan.hardware.num_gpus * plan.hardware.num_nodes
    batch = t.micro_batch * t.grad_accum * gpus
    if batch > IMPLAUSIBLE_BATCH:
        warnings.append(f"{t.micro_batch} x {t.grad_accum} accumulation x {gpus} GPU(s) is "
                        f"{batch:,} sequences per optimizer step: a run then takes very few steps, and LoRA in "
                        "particular learns less per example at large batches. Lower the gradient accumulation.")
    return warnings


def _stack(estimate: Any, on_gpu: bool = True) -> dict[str, int]:
    """Components for the stacked bar, topped up to the total the GPU must hold: what the components do
    not cover (the CUDA context, the allocator's slack, and any gap between their sum and the peak). Not on a
    GPU (`on_gpu` False): topped up to the peak of the tensors only."""
    parts = dict(estimate.components)
    rest = (int(estimate.total_bytes) if on_gpu else int(estimate.peak_allocated_bytes)) - sum(parts.values())
    if rest > 0:
        parts["context_and_slack"] = rest
    return parts


def guide_rows() -> tuple[list[str], list[list[Any]]]:
    """(headers, rows): the guide's quick-reference table (7B / 13B / 70B, GB) beside our estimate."""
    from advisor import memory

    by_size: dict[str, dict[str, Any]] = {}
    for row in memory.guide_table():
        by_size.setdefault(row.size, {})[row.method] = row
    headers = ["model", "Full: guide", "Full: ours", "LoRA: guide", "LoRA: ours", "QLoRA: guide", "QLoRA: ours"]
    rows = []
    for size, cells in by_size.items():
        line = [f"{size} ({next(iter(cells.values())).model_id.split('/')[-1]})"]
        for method in ("full", "lora", "qlora"):
            cell = cells.get(method)
            line += [gb(cell.guide_bytes, 0), gb(cell.estimate_bytes, 1)] if cell else ["-", "-"]
        rows.append(line)
    return headers, rows


def guide_note() -> str:
    """The sentence explaining why the guide's figures differ from ours, and what ours assume."""
    from advisor import memory

    return (memory.GUIDE_TABLE_NOTE + "\n\n*Ours: micro-batch 1, 512 tokens, sdpa attention; full fine-tuning "
            "with mixed-precision AdamW, LoRA / QLoRA rank 16 on the attention projections in bf16.*")


# -- plans in and out ------------------------------------------------------------------------------


#: A plan file the page reads at most (a plan is a few kB).
MAX_PLAN_BYTES = 1_000_000


def plan_from_file_text(text: str, source: str) -> Plan:
    """The plan in a plan.yaml's text, checked exactly as the CLI checks it (`Plan.from_yaml`); TunewiseError
    naming the setting, and the file, otherwise."""
    try:
        return Plan.from_yaml(text)
    except PlanError as exc:
        raise TunewiseError(f"{exc} (in {source})", field=exc.field) from None


def loaded_plan_base(plan_state: Mapping[str, Any] | None) -> Plan | None:
    """The plan last loaded into the page (a plan file or a run's plan), which keeps the settings no widget
    shows (the data's example and token counts, a cuda device) when the page turns its widgets into a plan."""
    loaded = (plan_state or {}).get("loaded_plan")
    return Plan.from_dict(loaded) if loaded else None
