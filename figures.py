"""Pure functions that turn run events (and planner numbers) into plotly figures.

Every function here takes plain data (the dicts read from a run's
`events.jsonl`, byte counts from the memory estimator, a dataset profile's
histogram) and returns a `plotly.graph_objects.Figure`, or a small frozen
dataclass of numbers for the page's text. Nothing here imports gradio or
touches files, so each figure can be tested from a synthetic list of events.

The event keys read here are the trainer's contract (trainer/events.py):
`log` events carry the trainer's metric keys unchanged (`loss`,
`learning_rate`, TRL's `rewards/margins`, `objective/kl`, ...), `eval` events
carry `eval_loss`, `forgetting` events carry `baseline_loss`, `loss`,
`degradation_pct` and `threshold_pct`, `alert` events carry a `message`.
A resumed run logs again from its checkpoint's step, so the loss chart draws
each attempt as its own line (`attempts`), split at the `resumed` events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import plotly.graph_objects as go

GB = 1e9
"""Bytes per GB (decimal, as GPU vendors count)."""

# Colours used consistently across the app's charts.
COLORS = {
    "loss": "#4f46e5",
    "eval": "#f97316",
    "lr": "#94a3b8",
    "reward": "#16a34a",
    "kl": "#dc2626",
    "forgetting": "#7c3aed",
    "baseline": "#64748b",
    "threshold": "#dc2626",
}
#: Training-loss colours of a run's attempts: the first, then each resume in turn (cycled).
ATTEMPT_COLORS = ("#4f46e5", "#0891b2", "#c026d3", "#65a30d", "#ea580c")

#: Memory components in stacking order (bottom to top) with their colours.
COMPONENT_COLORS = {
    "weights": "#4f46e5",
    "adapters": "#06b6d4",
    "gradients": "#f59e0b",
    "optimizer": "#ef4444",
    "activations": "#10b981",
    "logits": "#a855f7",
    "reference": "#64748b",
    "reward_model": "#0ea5e9",
    "value_model": "#84cc16",
    "generation": "#eab308",
    "overhead": "#cbd5e1",
    "context_and_slack": "#e2e8f0",
}

#: Keys that hold a reward-like number, most specific first: PPO's mean score, the mean reward of
#: sampled completions (our `sample` events: the reward model's score, or DPO's implicit reward),
#: PPO's KL-penalised reward, then DPO's logged implicit rewards. Same order as trainer/monitors.py.
REWARD_KEYS = (
    "objective/scores",
    "reward",
    "objective/rlhf_reward",
    "rewards/margins",
    "rewards/chosen",
)
#: Keys that hold a KL to the reference, summed over the completion (TRL's `objective/kl`, or the
#: sampled estimate in our `sample` events), then per-token variants.
KL_KEYS = ("objective/kl", "kl_sequence", "kl", "sampled_kl", "kl_estimate")
#: Event kinds that may carry reward or KL numbers.
PREFERENCE_KINDS = ("log", "sample", "eval")


def _base_layout(fig: go.Figure, title: str, x_title: str = "step", y_title: str = "") -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "font": {"size": 15}},
        template="plotly_white",
        height=330,
        margin={"l": 50, "r": 20, "t": 60, "b": 40},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
        hovermode="x unified",
        # Keep the user's zoom and legend toggles when the chart is redrawn with new points.
        uirevision="keep",
    )
    # Title the primary axes only: a second y axis (learning rate, KL) keeps its own title.
    fig.update_layout(xaxis_title=x_title)
    if y_title:
        fig.update_layout(yaxis_title=y_title)
    return fig


def empty_figure(title: str, message: str) -> go.Figure:
    """A blank chart with a centred note (e.g. "waiting for the first logged step")."""
    fig = go.Figure()
    _base_layout(fig, title)
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 13, "color": "#64748b"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _series(events: Iterable[Mapping], kind: str | tuple[str, ...], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) for every event of `kind` that carries a numeric `key`."""
    kinds = (kind,) if isinstance(kind, str) else kind
    steps: list[int] = []
    values: list[float] = []
    for event in events:
        if event.get("event") not in kinds:
            continue
        value = event.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(int(event.get("step") or 0))
            values.append(float(value))
    return steps, values


def attempts(events: Iterable[Mapping]) -> list[list[Mapping]]:
    """The events split into one list per attempt of the run, oldest first.

    An attempt after the first begins at its `resumed` event (the supervisor writes one before a
    resumed attempt starts, with the checkpoint's step), or, where that marker is missing (lost to a
    damaged log), at a `log` whose step is not after the previous one's: a resumed attempt logs again
    the steps after its checkpoint, which the attempt before it may have logged already."""
    parts: list[list[Mapping]] = [[]]
    last_logged: int | None = None
    for event in events:
        kind, step = event.get("event"), event.get("step")
        new_attempt = kind == "resumed" or (
            kind == "log" and isinstance(step, int) and last_logged is not None and step <= last_logged)
        if new_attempt and parts[-1]:
            parts.append([])
            last_logged = None
        parts[-1].append(event)
        if kind == "log" and isinstance(step, int):
            last_logged = step
    return parts


def _first_key(events: Sequence[Mapping], kinds: tuple[str, ...], keys: Sequence[str]) -> str | None:
    """The first of `keys` that appears with a number in any event of `kinds`."""
    for key in keys:
        if _series(events, kinds, key)[0]:
            return key
    return None


#: What each stage's own training objective is logged as (PPO logs no `loss`: its policy loss, and the
#: RLHF objective it maximises, have their own keys).
STAGE_LOSS_KEYS = {"ppo": ("loss/policy_avg",)}
STAGE_COLORS = {"sft": "#4f46e5", "rm": "#0891b2", "ppo": "#db2777", "dpo": "#16a34a"}


def is_pipeline(events: Sequence[Mapping]) -> bool:
    """Whether these are a pipeline's events (it writes `stage` events; its steps' events carry `stage`)."""
    return any(e.get("event") == "stage" for e in events)


def _stage_figure(events: Sequence[Mapping], title: str) -> go.Figure:
    """A pipeline's training curves: one line per stage in that stage's own objective (SFT / RM / DPO loss,
    PPO's policy loss and its RLHF objective on a second axis), the stage boundaries marked and named, on the
    pipeline's one timeline (each stage's steps after the earlier stages')."""
    fig = go.Figure()
    starts = [e for e in events if e.get("event") == "stage" and e.get("status") in ("started", "skipped")]
    for stage in dict.fromkeys(e.get("stage") for e in events if e.get("event") == "log" and e.get("stage")):
        logs = [e for e in events if e.get("event") == "log" and e.get("stage") == stage]
        key = next((k for k in (*STAGE_LOSS_KEYS.get(stage, ()), "loss") if _series(logs, "log", k)[0]), None)
        if key is None:
            continue
        steps, values = _series(logs, "log", key)
        label = f"{stage} {key.replace('loss/policy_avg', 'policy loss')}"
        fig.add_trace(go.Scatter(x=steps, y=values, name=label, mode="lines+markers", marker={"size": 4},
                                 line={"color": STAGE_COLORS.get(stage, "#64748b"), "width": 2}))
        if stage == "ppo" and _series(logs, "log", "objective/rlhf_reward")[0]:
            steps, values = _series(logs, "log", "objective/rlhf_reward")
            fig.add_trace(go.Scatter(x=steps, y=values, name="ppo objective (reward - KL penalty)", yaxis="y2",
                                     mode="lines", line={"color": STAGE_COLORS["ppo"], "width": 1.5, "dash": "dot"}))
            fig.update_layout(yaxis2={"title": "RLHF objective", "overlaying": "y", "side": "right", "showgrid": False})
    evals = [e for e in events if e.get("event") == "eval"]
    if _series(evals, "eval", "eval_loss")[0]:
        steps, values = _series(evals, "eval", "eval_loss")
        fig.add_trace(go.Scatter(x=steps, y=values, name="eval loss", mode="markers",
                                 marker={"size": 8, "symbol": "diamond", "color": COLORS["eval"]}))
    if not fig.data:
        return empty_figure(title, "Waiting for the first logged step...")
    for start in starts:
        fig.add_vline(x=int(start.get("step") or 0) + 0.5, line={"color": "#94a3b8", "width": 1, "dash": "dash"},
                      annotation_text=str(start.get("stage")), annotation_position="top left")
    _base_layout(fig, title, y_title="loss (each stage's own)")
    return fig


def loss_figure(events: Sequence[Mapping], title: str = "Loss") -> go.Figure:
    """Training loss (every `log`), eval loss (`eval` events), EWC's penalty when the safeguard is on,
    and the learning rate on a second axis.

    One line per attempt (see `attempts`): after a resume the steps from the checkpoint on are logged
    again, and one line through both attempts would run back along the x axis. The first attempt's
    line is "training loss", a resumed one's "training loss (resumed at step N)"; the other series'
    later attempts join their first line's legend entry."""
    if is_pipeline(events):
        return _stage_figure(events, title)
    parts = attempts(events)
    resumed_at = [next((e.get("step") for e in part if e.get("event") == "resumed"), None) for part in parts]
    if not any(_series(part, "log", "loss")[0] or _series(part, "eval", "eval_loss")[0] for part in parts):
        return empty_figure(title, "Waiting for the first logged step...")
    fig = go.Figure()
    for index, part in enumerate(parts):
        steps, loss = _series(part, "log", "loss")
        if not steps:
            continue
        start = resumed_at[index] if isinstance(resumed_at[index], int) else steps[0] - 1
        name = "training loss" if not fig.data else f"training loss (resumed at step {start})"
        fig.add_trace(go.Scatter(x=steps, y=loss, name=name, mode="lines+markers", marker={"size": 4},
                                 line={"color": ATTEMPT_COLORS[len(fig.data) % len(ATTEMPT_COLORS)], "width": 2}))
    for kind, key, name, style in (
        ("eval", "eval_loss", "eval loss", {"mode": "lines+markers", "marker": {"size": 8, "symbol": "diamond"},
                                            "line": {"color": COLORS["eval"], "width": 2}}),
        # EWC's share of the training loss: how hard the safeguard is pulling towards the original weights.
        ("log", "ewc_penalty", "EWC penalty (part of the loss)",
         {"mode": "lines", "line": {"color": COLORS["forgetting"], "width": 1.5, "dash": "dash"}}),
        ("log", "learning_rate", "learning rate",
         {"mode": "lines", "yaxis": "y2", "line": {"color": COLORS["lr"], "width": 1.5, "dash": "dot"}}),
    ):
        first = True
        for part in parts:
            steps, values = _series(part, kind, key)
            if steps:
                fig.add_trace(go.Scatter(x=steps, y=values, name=name, legendgroup=name, showlegend=first, **style))
                first = False
        if key == "learning_rate" and not first:
            fig.update_layout(yaxis2={"title": "learning rate", "overlaying": "y", "side": "right",
                                      "showgrid": False, "exponentformat": "e", "rangemode": "tozero"})
    best = best_checkpoint(events)
    if best is not None:
        fig.add_trace(go.Scatter(x=[best["step"]], y=[best["eval_loss"]], name=f"best checkpoint (step {best['step']})",
                                 mode="markers", marker={"size": 14, "symbol": "star", "color": COLORS["eval"],
                                                         "line": {"color": "#111827", "width": 1}}))
    _base_layout(fig, title, y_title="loss")
    return fig


def best_checkpoint(events: Sequence[Mapping]) -> Mapping | None:
    """The latest `best_checkpoint` event (early stopping: the step whose weights the output holds), or None."""
    found = None
    for event in events:
        if (event.get("event") == "best_checkpoint" and isinstance(event.get("step"), int)
                and isinstance(event.get("eval_loss"), (int, float))):
            found = event
    return found


def best_checkpoint_text(best: Mapping | None) -> str:
    """One line on early stopping's outcome for the monitor and the history ("" without one)."""
    if not best:
        return ""
    how = (f"early stopping ended the run at step {best.get('stopped_at')}" if best.get("early_stopped")
           else "early stopping was on")
    return f"{how}; best checkpoint: step {best['step']} (eval loss {best['eval_loss']:.4f}), which the output holds"


def reward_kl_series(events: Sequence[Mapping]) -> dict:
    """The reward and KL series of a preference run: {"reward_key", "kl_key", "reward": (steps, values),
    "kl": (steps, values), "margins": (steps, values)}; a key is None when the run logs no such number.
    `margins` is DPO's logged `rewards/margins` when the main reward is something else."""
    reward_key = _first_key(events, PREFERENCE_KINDS, REWARD_KEYS)
    kl_key = _first_key(events, PREFERENCE_KINDS, KL_KEYS)
    reward = _series(events, PREFERENCE_KINDS, reward_key) if reward_key else ([], [])
    kl = _series(events, PREFERENCE_KINDS, kl_key) if kl_key else ([], [])
    margins = _series(events, "log", "rewards/margins") if reward_key != "rewards/margins" else ([], [])
    return {"reward_key": reward_key, "kl_key": kl_key, "reward": reward, "kl": kl, "margins": margins}


def _named(what: str, key: str | None) -> str:
    """A series' name: "reward", or "reward (objective/scores)" when the logged key says more than the word."""
    return what if not key or key.lower() == what.lower() else f"{what} ({key})"


def reward_kl_time_figure(events: Sequence[Mapping], title: str = "Reward and KL over time") -> go.Figure:
    """Reward (left axis) and KL to the reference (right axis) against the step."""
    series = reward_kl_series(events)
    if not series["reward"][0] and not series["kl"][0]:
        return empty_figure(title, "No reward or KL yet (preference stages log them: DPO, PPO).")
    fig = go.Figure()
    if series["reward"][0]:
        fig.add_trace(go.Scatter(x=series["reward"][0], y=series["reward"][1], name=_named("reward", series["reward_key"]),
                                 mode="lines+markers", marker={"size": 4}, line={"color": COLORS["reward"], "width": 2}))
    if series["kl"][0]:
        fig.add_trace(go.Scatter(x=series["kl"][0], y=series["kl"][1], name=_named("KL", series["kl_key"]), yaxis="y2",
                                 mode="lines+markers", marker={"size": 5}, line={"color": COLORS["kl"], "width": 2}))
        fig.update_layout(yaxis2={"title": "KL (nats)", "overlaying": "y", "side": "right", "showgrid": False})
    if series["margins"][0]:
        fig.add_trace(go.Scatter(x=series["margins"][0], y=series["margins"][1], name="DPO reward margin",
                                 mode="lines", line={"color": COLORS["reward"], "width": 1.5, "dash": "dot"}))
    _base_layout(fig, title, y_title="reward")
    return fig


def reward_vs_kl_figure(events: Sequence[Mapping], title: str = "Reward against KL") -> go.Figure:
    """The trade-off frontier: one point per step that has both a reward and a KL, coloured by step.

    A measurement that carries both (a `sample` event, a PPO `log`) is one point; otherwise each KL
    is paired with the reward logged at the same step, or the latest one before it.
    """
    series = reward_kl_series(events)
    reward_key, kl_key = series["reward_key"], series["kl_key"]
    points: list[tuple[int, float, float]] = []
    if reward_key and kl_key:
        for event in events:
            kl, reward = event.get(kl_key), event.get(reward_key)
            if event.get("event") in PREFERENCE_KINDS and isinstance(kl, (int, float)) and isinstance(reward, (int, float)):
                points.append((int(event.get("step") or 0), float(kl), float(reward)))
    if not points:
        reward_steps, rewards = series["reward"]
        for kl_step, kl in zip(*series["kl"]):
            earlier = [r for s, r in zip(reward_steps, rewards) if s <= kl_step]
            if earlier:
                points.append((kl_step, kl, earlier[-1]))
    if len(points) < 2:  # one point is the start (KL 0 to itself): a trade-off needs a second
        return empty_figure(title, "Needs two reward-and-KL measurements (the first is the start, at KL 0).")
    steps, x, y = zip(*points)
    fig = go.Figure(go.Scatter(
        x=list(x), y=list(y), mode="lines+markers", name="reward vs KL",
        text=[f"step {s}" for s in steps],
        line={"color": "#cbd5e1", "width": 1},
        marker={"size": 9, "color": list(steps), "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": "step", "thickness": 12}},
        hovertemplate="KL %{x:.4f}<br>reward %{y:.4f}<br>%{text}<extra></extra>",
    ))
    _base_layout(fig, title, x_title=_named("KL", kl_key), y_title=_named("reward", reward_key))
    fig.update_layout(hovermode="closest", showlegend=False)
    return fig


def forgetting_figure(events: Sequence[Mapping], title: str = "Forgetting: original-domain loss") -> go.Figure:
    """Original-domain loss against its baseline, with the alert threshold as a line."""
    measured = [e for e in events if e.get("event") == "forgetting" and isinstance(e.get("loss"), (int, float))]
    if not measured:
        return empty_figure(title, "No forgetting measurement yet (the monitor runs before training and every N steps).")
    steps = [int(e.get("step") or 0) for e in measured]
    losses = [float(e["loss"]) for e in measured]
    baseline = next((float(e["baseline_loss"]) for e in measured if isinstance(e.get("baseline_loss"), (int, float))), losses[0])
    threshold_pct = next((float(e["threshold_pct"]) for e in reversed(measured)
                          if isinstance(e.get("threshold_pct"), (int, float))), None)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=losses, name="original-domain loss", mode="lines+markers",
                             marker={"size": 7}, line={"color": COLORS["forgetting"], "width": 2},
                             customdata=[e.get("degradation_pct") for e in measured],
                             hovertemplate="loss %{y:.4f}<br>%{customdata:.1f}% above baseline<extra></extra>"))
    x_span = [min(steps), max(max(steps), min(steps) + 1)]
    fig.add_trace(go.Scatter(x=x_span, y=[baseline, baseline], name=f"baseline {baseline:.3f}", mode="lines",
                             line={"color": COLORS["baseline"], "dash": "dash", "width": 1.5}, hoverinfo="skip"))
    if threshold_pct is not None:
        # The alert fires when loss > baseline x (1 + threshold%).
        limit = baseline * (1.0 + threshold_pct / 100.0)
        fig.add_trace(go.Scatter(x=x_span, y=[limit, limit], name=f"threshold +{threshold_pct:g}%", mode="lines",
                                 line={"color": COLORS["threshold"], "dash": "dot", "width": 2}, hoverinfo="skip"))
    _base_layout(fig, title, y_title="loss")
    return fig


def memory_figure(estimates: Mapping[str, Mapping[str, int]], gpu_bytes: int | None = None,
                  gpu_label: str = "GPU", title: str = "Memory per GPU by component") -> go.Figure:
    """Stacked bars: one bar per method ({"Full": {"weights": bytes, ...}, "LoRA": ...}), one colour per component.

    `gpu_bytes` draws the chosen GPU's memory as a horizontal line.
    """
    if not estimates:
        return empty_figure(title, "Pick a model to see its memory.")
    methods = list(estimates)
    components: list[str] = []
    for parts in estimates.values():
        for name in parts:
            if name not in components:
                components.append(name)
    order = [c for c in COMPONENT_COLORS if c in components] + [c for c in components if c not in COMPONENT_COLORS]
    # GB for real models; MB when even the largest total is under 1 GB (the demo model).
    largest = max(sum(parts.values()) for parts in estimates.values())
    unit, scale = ("GB", GB) if largest >= GB else ("MB", 1e6)
    fig = go.Figure()
    for component in order:
        values = [estimates[m].get(component, 0) / scale for m in methods]
        if not any(values):
            continue
        fig.add_trace(go.Bar(x=methods, y=values, name=component.replace("_", " "),
                             marker_color=COMPONENT_COLORS.get(component),
                             hovertemplate="%{x}: %{y:.2f} " + unit + "<extra>" + component + "</extra>"))
    totals = [sum(estimates[m].values()) / scale for m in methods]
    fig.add_trace(go.Scatter(x=methods, y=totals, mode="text", text=[f"{t:.1f} {unit}" for t in totals],
                             textposition="top center", showlegend=False, hoverinfo="skip"))
    top = max(totals)
    if gpu_bytes and gpu_bytes / scale < 3 * top:  # draw the card's line only where it keeps the bars readable
        fig.add_hline(y=gpu_bytes / scale, line_dash="dash", line_color=COLORS["threshold"],
                      annotation_text=f"{gpu_label}: {gpu_bytes / GB:.0f} GB", annotation_position="top left")
        top = max(top, gpu_bytes / scale)
    _base_layout(fig, title, x_title="", y_title=unit)
    fig.update_layout(barmode="stack", hovermode="closest", height=400, yaxis={"range": [0, top * 1.18]},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.08, "xanchor": "left", "x": 0.0})
    return fig


def token_histogram_figure(bin_edges: Sequence[float], counts: Sequence[int], recommended_seq_len: int | None = None,
                           p95: float | None = None, title: str = "Tokens per example") -> go.Figure:
    """The dataset's token-length histogram (`len(bin_edges) == len(counts) + 1`) with the recommended
    sequence length (and the 95th percentile) as vertical lines."""
    if not counts:
        return empty_figure(title, "Pick or upload a dataset to see its token lengths.")
    centers = [(bin_edges[i] + bin_edges[i + 1]) / 2 for i in range(len(counts))]
    widths = [bin_edges[i + 1] - bin_edges[i] for i in range(len(counts))]
    fig = go.Figure(go.Bar(x=centers, y=list(counts), width=widths, name="examples", marker_color=COLORS["loss"],
                           hovertemplate="%{x:.0f} tokens: %{y} examples<extra></extra>"))
    if p95 is not None:
        fig.add_vline(x=p95, line_dash="dot", line_color=COLORS["baseline"], annotation_text=f"p95 {p95:.0f}",
                      annotation_position="top left")
    if recommended_seq_len:
        fig.add_vline(x=recommended_seq_len, line_dash="dash", line_color=COLORS["eval"],
                      annotation_text=f"sequence length {recommended_seq_len}", annotation_position="top right")
    _base_layout(fig, title, x_title="tokens", y_title="examples")
    fig.update_layout(hovermode="closest", showlegend=False, bargap=0.05, height=280)
    return fig


#: Metrics that sample events carry (policy samples of the preference stages); eval_* come from eval events.
SAMPLE_METRICS = ("reward", "kl_sequence", "kl")


def metric_kind(metric: str) -> str:
    """The event kind that carries `metric`: eval for eval_*, sample for the policy-sample numbers, else log."""
    return "eval" if metric.startswith("eval") else ("sample" if metric in SAMPLE_METRICS else "log")


def overlay_figure(runs: Mapping[str, Sequence[Mapping]], metric: str = "loss", kind: str | None = None,
                   title: str | None = None) -> go.Figure:
    """One line per run ({label: events}) of `metric` from events of `kind` (default: `metric_kind`)."""
    kind = kind or metric_kind(metric)
    title = title or f"{metric} by run"
    fig = go.Figure()
    for label, events in runs.items():
        steps, values = _series(events, kind, metric)
        if steps:
            fig.add_trace(go.Scatter(x=steps, y=values, name=label, mode="lines+markers", marker={"size": 4}))
    if not fig.data:
        return empty_figure(title, "Choose runs with logged points to compare them.")
    _base_layout(fig, title, y_title=metric)
    return fig


#: The compare pipeline's numbers, in the order the table shows them: (key, row label, format).
COMPARISON_ROWS = (
    ("heldout_accuracy", "held-out preference accuracy", "{:.1%}"),
    ("reward", "reward of held-out samples", "{:.4f}"),
    ("reward_source", "scored by", "{}"),
    ("kl", "KL to the SFT model (per token)", "{:.4f}"),
    ("kl_sequence", "KL per completion", "{:.4f}"),
    ("forgetting_degradation_pct", "forgetting (original-domain loss)", "{:+.1f}%"),
    ("reward_model_heldout_accuracy", "reward model held-out accuracy", "{:.1%}"),
    ("alerts", "alerts", "{}"),
    ("wall_s", "wall time", "{:.0f} s"),
)


def comparison_table(events: Sequence[Mapping]) -> dict | None:
    """The compare (or rlhf / dpo) pipeline's side-by-side table from its `comparison` event, as a Dataframe
    value {"headers", "data"}: one row per number, one column per branch (RLHF via PPO, DPO); None before it."""
    report = next((e for e in reversed(events) if e.get("event") == "comparison"), None)
    branches = (report or {}).get("branches") or {}
    if not branches:
        return None
    names = {"rlhf": "RLHF (SFT -> RM -> PPO)", "dpo": "DPO (SFT -> DPO)"}
    rows = []
    for key, label, form in COMPARISON_ROWS:
        values = [branch.get(key) for branch in branches.values()]
        if all(value is None for value in values):
            continue
        rows.append([label] + ["-" if value is None else form.format(value) for value in values])
    return {"headers": ["", *(names.get(name, name) for name in branches)], "data": rows}


@dataclass(frozen=True)
class RunProgress:
    """Where a run stands, computed from its events."""

    step: int
    """Latest optimizer step seen in any event."""
    max_steps: int | None
    """Total steps (from `train_begin`), None until training has begun."""
    fraction: float
    """step / max_steps in [0, 1] (0 when the total is unknown)."""
    elapsed_s: float
    """Seconds since the run started (first event), up to `now` or the terminal event."""
    eta_s: float | None
    """Estimated seconds left, from the mean time per step since `train_begin`; None when unknown."""
    last_loss: float | None
    """Most recent training loss."""
    state: str
    """"starting", "training", or the terminal event kind (finished / failed / stopped)."""
    reason: str | None
    """Why a run ended (from the terminal event), when it says."""
    stage: str | None
    """Current pipeline stage, from the latest `stage` event."""
    stage_index: int | None = None
    """Which step of its pipeline the current stage is (1-based), and of how many (`stages`)."""
    stages: int | None = None
    stage_step: int | None = None
    """The current stage's own step (a pipeline's `step` counts across its stages)."""


def run_progress(events: Sequence[Mapping], now: float | None = None) -> RunProgress:
    """Progress, elapsed time and time left from a run's events."""
    now = time.time() if now is None else now
    # The current attempt: after a resume, the previous attempt's terminal event must not freeze the clock.
    current = attempts(events)[-1] if events else []
    first_time = events[0].get("time", now) if events else now
    events = current
    step = max((int(e.get("step") or 0) for e in events), default=0)
    begin = next((e for e in reversed(events) if e.get("event") == "train_begin"), None)
    max_steps = int(begin["max_steps"]) if begin and isinstance(begin.get("max_steps"), (int, float)) else None
    terminal = next((e for e in reversed(events) if e.get("event") in ("finished", "failed", "stopped")), None)
    start_time = float(first_time)  # elapsed counts from the run's first event, across attempts
    end_time = float(terminal.get("time", now)) if terminal else now
    eta = None
    if begin and max_steps and not terminal:
        begin_step = int(begin.get("step") or 0)
        done = step - begin_step
        if done > 0:
            # Mean seconds per step since training began, times the steps left.
            per_step = (now - float(begin.get("time", now))) / done
            eta = max(0.0, per_step * (max_steps - step))
    losses = _series(events, "log", "loss")[1]
    state = terminal["event"] if terminal else ("training" if begin else "starting")
    stage_event = next((e for e in reversed(events) if e.get("event") == "stage"), None)
    fraction = min(1.0, step / max_steps) if max_steps else 0.0
    stage_index = stages = stage_step = None
    if stage_event is not None:
        # A pipeline: the current stage's own progress (its train_begin and logs carry local steps), and the
        # whole run's as the stages done plus the share of this one.
        stage_index, stages = int(stage_event.get("index") or 1), stage_event.get("of")
        stages = int(stages) if isinstance(stages, int) else None
        name = stage_event.get("stage")
        local = [e for e in events if e.get("stage") == name and e.get("event") in ("train_begin", "log")]
        begin = next((e for e in reversed(local) if e.get("event") == "train_begin"), None)
        max_steps = int(begin["max_steps"]) if begin and isinstance(begin.get("max_steps"), int) else None
        stage_step = max((int(e.get("local_step") or 0) for e in local if e.get("event") == "log"), default=0)
        done = stage_event.get("status") in ("finished", "skipped")
        share = 1.0 if done else (min(1.0, stage_step / max_steps) if max_steps else 0.0)
        fraction = min(1.0, (stage_index - 1 + share) / stages) if stages else 0.0
        eta = None
        if begin and max_steps and not terminal and stage_step > 0 and not done:
            per_step = (now - float(begin.get("time", now))) / stage_step
            eta = max(0.0, per_step * (max_steps - stage_step))
    if terminal and terminal["event"] == "finished":
        fraction = 1.0
    return RunProgress(
        step=step,
        max_steps=max_steps,
        fraction=fraction,
        elapsed_s=max(0.0, end_time - start_time),
        eta_s=eta,
        last_loss=losses[-1] if losses else None,
        state=state,
        reason=(terminal.get("reason") or terminal.get("error")) if terminal else None,
        stage=(stage_event.get("stage") or stage_event.get("name")) if stage_event else None,
        stage_index=stage_index,
        stages=stages,
        stage_step=stage_step,
    )


def alert_messages(events: Sequence[Mapping]) -> list[str]:
    """The plain-language message of every `alert` event, oldest first, prefixed with its step (the run's
    step: a pipeline's steps count across its stages, as its charts do, and the stage is named)."""
    messages = []
    for event in events:
        if event.get("event") == "alert":
            text = event.get("message") or event.get("kind") or "alert"
            stage = f" ({event['stage']})" if event.get("stage") else ""
            messages.append(f"step {int(event.get('step') or 0)}{stage}: {text}")
    return messages


def notice_messages(events: Sequence[Mapping]) -> list[str]:
    """What the trainer adjusted or wants seen (`notice` and `note` events: a precision the machine cannot
    run, processes run on the CPU, a safeguard off for a stage), oldest first, each once."""
    seen: dict[str, None] = {}
    for event in events:
        if event.get("event") in ("notice", "note") and event.get("message"):
            seen.setdefault(str(event["message"]), None)
    return list(seen)


def format_duration(seconds: float | None) -> str:
    """'1 h 05 min', '3 min 20 s', '12 s', or '-' when unknown."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


# -- the monitor's text: its header and the alerts (HTML / Markdown strings) -----------------------------


def _escape(text: Any) -> str:
    import html

    return html.escape(str(text))


def run_header_html(run_id: str | None, progress: RunProgress | None, status: Any = None) -> str:
    """The monitor's header: run id, state badge, a progress bar, step / total, time left and elapsed;
    the reason when the run failed or stopped. `status` is the run's trainer.status.RunStatus (or None)."""
    if not run_id:
        return ("<div class='tw-run tw-idle'><b>No run yet.</b> Launch the plan from step 3, or open a run "
                "from the history in step 5.</div>")
    state = getattr(status, "state", None) or progress.state
    if state == "training":
        state = "running"
    total = progress.max_steps
    pct = int(round(progress.fraction * 100))
    steps = f"step {progress.step} / {total}" if total else f"step {progress.step}"
    if progress.stage_index is not None:  # a pipeline: which stage, and that stage's own step / total
        of = f"/{progress.stages}" if progress.stages else ""
        steps = (f"stage {progress.stage_index}{of} ({_escape(progress.stage)}) &middot; its step {progress.stage_step}"
                 + (f" / {total}" if total else ""))
    eta = f" &middot; about {format_duration(progress.eta_s)} left" if progress.eta_s is not None and state == "running" else ""
    loss = f" &middot; loss {progress.last_loss:.4f}" if progress.last_loss is not None else ""
    stage = ""
    reason = ""
    if state in ("failed", "stopped") and (progress.reason or getattr(status, "error", None)):
        reason = f"<div class='tw-reason'>{_escape(progress.reason or getattr(status, 'error', ''))}</div>"
    if getattr(status, "best_step", None) is not None and getattr(status, "best_eval_loss", None) is not None:
        best = {"step": status.best_step, "eval_loss": status.best_eval_loss, "early_stopped": status.early_stopped,
                "stopped_at": status.step}
        reason += f"<div class='tw-reason tw-best'>{_escape(best_checkpoint_text(best))}</div>"
    return (
        f"<div class='tw-run tw-{state}'>"
        f"<div class='tw-run-head'><span class='tw-badge tw-badge-{state}'>{state}</span> "
        f"<code>{_escape(run_id)}</code> &middot; {steps}{eta}{loss}{stage} "
        f"&middot; elapsed {format_duration(progress.elapsed_s)}</div>"
        f"<div class='tw-bar'><div class='tw-bar-fill' style='width:{pct}%'></div></div>{reason}</div>"
    )


def alerts_markdown(messages: Sequence[str], notices: Sequence[str] = ()) -> str:
    """The monitor's banner: the alerts (the newest 20, in bold), then the trainer's notices; or a line
    saying what the monitors watch."""
    lines = [f"- **{_escape(m)}**" for m in messages[-20:]] + [f"- note: {_escape(n)}" for n in notices]
    if not lines:
        return "No alerts so far. The monitors watch forgetting, KL explosion, reward hacking and mode collapse."
    return "\n".join(lines)


# -- measured memory beside the estimate ---------------------------------------------------------------

#: The `log` event key each device's estimate is compared with (trainer/memwatch.py): on CUDA the peak of
#: allocated tensors against the estimate's peak; on the CPU the process's peak RSS against the host RAM estimate.
MEASURED_KEYS = {"cuda": "memory/max_allocated_bytes", "cpu": "memory/peak_rss_bytes"}
MEASURED_NAMES = {"cuda": ("GPU tensors (max_memory_allocated)", "estimated peak per GPU"),
                  "cpu": ("host RAM (peak RSS)", "host RAM estimate")}


@dataclass(frozen=True)
class MemorySeries:
    """A run's measured memory by step and the plan's estimate it is compared with."""

    device: str | None
    """cuda or cpu (from the `started` event's memory_estimate); None when the run carries no estimate."""
    steps: tuple[int, ...]
    measured: tuple[int, ...]
    """The measured peak at each logged step, in bytes (a peak: it never falls within an attempt)."""
    estimate: int | None
    """The plan's estimate in bytes (`memory_estimate.estimate_bytes`)."""
    reserved: tuple[int, ...] = ()
    """On CUDA, max_memory_reserved at the same steps (allocator caching on top of the tensors)."""

    @property
    def error_pct(self) -> float | None:
        """(estimate - measured peak) / measured peak, in %: negative when the run used more than estimated."""
        if not self.estimate or not self.measured or not max(self.measured):
            return None
        peak = max(self.measured)
        return 100.0 * (self.estimate - peak) / peak


def memory_series(events: Sequence[Mapping]) -> MemorySeries:
    """The measured peak at each `log` event and the estimate of the latest `started` event."""
    started = [e for e in events if e.get("event") == "started" and isinstance(e.get("memory_estimate"), Mapping)]
    estimate = started[-1]["memory_estimate"] if started else {}
    device = estimate.get("device") if estimate.get("device") in MEASURED_KEYS else None
    keys = [MEASURED_KEYS[device]] if device else list(MEASURED_KEYS.values())
    steps, measured, reserved = [], [], []
    for event in events:
        if event.get("event") != "log":
            continue
        key = next((k for k in keys if _is_count(event.get(k))), None)
        if key is None:
            continue
        if device is None:
            device = next(d for d, k in MEASURED_KEYS.items() if k == key)
            keys = [key]
        steps.append(int(event.get("step") or 0))
        measured.append(int(event[key]))
        if _is_count(event.get("memory/max_reserved_bytes")):
            reserved.append(int(event["memory/max_reserved_bytes"]))
    value = estimate.get("estimate_bytes")
    return MemorySeries(device, tuple(steps), tuple(measured), int(value) if _is_count(value) else None,
                        tuple(reserved) if len(reserved) == len(measured) else ())


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def memory_run_figure(events: Sequence[Mapping], title: str = "Memory: measured peak against the estimate") -> go.Figure:
    """The measured peak at each logged step as a line and the plan's estimate as a dashed level, with the
    error in the title; on CUDA the allocator's reserved peak as a faint line above."""
    series = memory_series(events)
    if not series.measured:
        message = ("No measurement yet: every log carries the trainer's measured peak."
                   if series.estimate is None else
                   f"Estimate {_bytes_text(series.estimate)}; the measured peak arrives with the first log.")
        return empty_figure(title, message)
    measured_name, estimate_name = MEASURED_NAMES[series.device or "cpu"]
    largest = max([*series.measured, *series.reserved, series.estimate or 0])
    unit, scale = ("GB", GB) if largest >= GB else ("MB", 1e6)
    fig = go.Figure()
    if series.reserved:
        fig.add_trace(go.Scatter(x=list(series.steps), y=[r / scale for r in series.reserved], mode="lines",
                                 name="reserved (max_memory_reserved)", line={"color": "#cbd5e1", "width": 1.5},
                                 hovertemplate="reserved %{y:.2f} " + unit + "<extra></extra>"))
    fig.add_trace(go.Scatter(x=list(series.steps), y=[m / scale for m in series.measured], mode="lines+markers",
                             name=f"measured: {measured_name}", line={"color": COLORS["loss"], "width": 2},
                             marker={"size": 6}, hovertemplate="step %{x}: %{y:.2f} " + unit + "<extra></extra>"))
    if series.estimate is not None:
        span = [min(series.steps), max(max(series.steps), min(series.steps) + 1)]
        fig.add_trace(go.Scatter(x=span, y=[series.estimate / scale] * 2, mode="lines", hoverinfo="skip",
                                 name=f"{estimate_name} {series.estimate / scale:.2f} {unit}",
                                 line={"color": COLORS["eval"], "dash": "dash", "width": 2}))
    error = series.error_pct
    if error is not None:
        title = f"{title}: {error:+.0f}%"
    _base_layout(fig, title, y_title=unit)
    fig.update_layout(yaxis={"rangemode": "tozero"})
    return fig


def _bytes_text(nbytes: int) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.0f} MB"


# -- the learning-rate pilot (trainer/pilot.py) ------------------------------------------------------------

#: Colours of the pilot's candidate rates, lowest rate first (cycled).
PILOT_COLORS = ("#0ea5e9", "#6366f1", "#16a34a", "#f59e0b", "#dc2626", "#a855f7", "#64748b")


def pilot_candidates(events: Sequence[Mapping]) -> list[dict]:
    """Each candidate's latest `candidate` event (started, or how it ended), in the order they began."""
    latest: dict[int, dict] = {}
    for event in events:
        if event.get("event") == "candidate" and isinstance(event.get("candidate"), int):
            latest[event["candidate"]] = dict(event)
    return [latest[index] for index in sorted(latest)]


def _rate_label(rate: Any) -> str:
    return f"{rate:.1e}" if isinstance(rate, (int, float)) else "?"


def pilot_loss_figure(events: Sequence[Mapping], title: str = "Pilot: training loss per candidate rate") -> go.Figure:
    """One line per candidate: its training loss against its own steps (the pilot's `log` events carry
    `candidate`, `rate`, `round` and `local_step`); round 2's longer runs are drawn dashed."""
    lines: dict[int, dict] = {}
    for event in events:
        if event.get("event") != "log" or not isinstance(event.get("candidate"), int):
            continue
        loss = event.get("loss")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            continue
        line = lines.setdefault(event["candidate"], {"rate": event.get("rate"), "round": event.get("round"), "x": [], "y": []})
        line["x"].append(int(event.get("local_step") or 0))
        line["y"].append(float(loss))
    if not lines:
        return empty_figure(title, "Waiting for the first candidate's steps...")
    rates = sorted({line["rate"] for line in lines.values() if isinstance(line["rate"], (int, float))})
    fig = go.Figure()
    for index in sorted(lines):
        line = lines[index]
        colour = PILOT_COLORS[rates.index(line["rate"]) % len(PILOT_COLORS)] if line["rate"] in rates else "#94a3b8"
        second = line["round"] == 2
        fig.add_trace(go.Scatter(
            x=line["x"], y=line["y"], mode="lines", name=f"{_rate_label(line['rate'])}" + (" (round 2)" if second else ""),
            line={"color": colour, "width": 2, "dash": "dash" if second else "solid"}))
    _base_layout(fig, title, x_title="step of the candidate", y_title="training loss")
    fig.update_layout(hovermode="closest")
    return fig


def pilot_rate_figure(events: Sequence[Mapping], title: str = "Pilot: held-out loss against the rate") -> go.Figure:
    """Each finished candidate's held-out loss against its rate on a log axis (round 1 circles, round 2
    diamonds), diverged or failed rates as crosses along the top, the chosen rate starred (with the best rate
    at the pilot's horizon it was moved from, when the transfer moved it)."""
    candidates = [c for c in pilot_candidates(events) if c.get("status") not in (None, "started")]
    if not candidates:
        return empty_figure(title, "Waiting for the first candidate to finish...")
    finished = [c for c in candidates if isinstance(c.get("eval_loss"), (int, float))]
    fig = go.Figure()
    for round_no, symbol in ((1, "circle"), (2, "diamond")):
        points = sorted((c for c in finished if c.get("round") == round_no), key=lambda c: c["rate"])
        if points:
            steps = points[0].get("steps")
            fig.add_trace(go.Scatter(
                x=[c["rate"] for c in points], y=[c["eval_loss"] for c in points], mode="lines+markers",
                name=f"round {round_no} ({steps} steps)", marker={"size": 10, "symbol": symbol},
                line={"color": COLORS["loss"] if round_no == 1 else COLORS["eval"], "width": 1.5}))
    bad = [c for c in candidates if c not in finished]
    if bad:
        top = max((c["eval_loss"] for c in finished), default=1.0)
        fig.add_trace(go.Scatter(
            x=[c["rate"] for c in bad], y=[top * 1.05 for _ in bad], mode="markers+text", name="diverged / failed",
            text=[c.get("status") for c in bad], textposition="bottom center",
            marker={"size": 11, "symbol": "x", "color": COLORS["threshold"]}))
    result = next((e for e in reversed(events) if e.get("event") == "pilot_result"), None)
    chosen = result.get("chosen_rate") if result else None
    if isinstance(chosen, (int, float)):
        chosen_loss = result.get("chosen_eval_loss")
        measured = result.get("measured") or {}
        name = f"chosen {_rate_label(chosen)}"
        if isinstance(measured.get("measured_rate"), (int, float)) and measured["measured_rate"] != chosen:
            # The best at the pilot's horizon, moved to the run's: drawn at the loss it was measured with.
            fig.add_trace(go.Scatter(
                x=[measured["measured_rate"], chosen], y=[chosen_loss, chosen_loss], mode="lines+markers",
                name=f"best at {measured.get('measured_steps')} steps {_rate_label(measured['measured_rate'])}",
                line={"color": COLORS["reward"], "width": 1.5, "dash": "dot"}, marker={"size": 9, "symbol": "circle-open"}))
            name += f" for the run's {measured.get('run_steps')} steps"
        fig.add_trace(go.Scatter(x=[chosen], y=[chosen_loss], mode="markers", name=name,
                                 marker={"size": 18, "symbol": "star", "color": COLORS["reward"],
                                         "line": {"width": 1, "color": "#14532d"}}))
    _base_layout(fig, title, x_title="peak learning rate (log scale)", y_title="held-out loss")
    fig.update_xaxes(type="log", exponentformat="e")
    fig.update_layout(hovermode="closest")
    return fig


def pilot_markdown(events: Sequence[Mapping], state: str | None = None) -> str:
    """The pilot in words for the page: its design, where it is, and the chosen rate with what it spent."""
    design = next((e for e in events if e.get("event") == "pilot"), None)
    if design is None:
        return "Starting the pilot..." if state in (None, "queued", "running") else f"The pilot {state}."
    lines = [f"**Pilot:** {design.get('message', '').removeprefix('learning-rate pilot: ')}"]
    done = [c for c in pilot_candidates(events) if c.get("status") not in (None, "started")]
    lines.append(f"{len(done)} of {len(design.get('rates') or []) + (design.get('keep') or 0)} candidates measured "
                 f"on {design.get('eval_examples')} held-out examples.")
    result = next((e for e in reversed(events) if e.get("event") == "pilot_result"), None)
    if result:
        if result.get("chosen_rate"):
            measured = result.get("measured") or {}
            moved = ""
            rate, steps, run = measured.get("measured_rate"), measured.get("measured_steps"), measured.get("run_steps")
            if isinstance(rate, (int, float)) and rate != result["chosen_rate"]:
                moved = (f", moved from the best at {steps} steps ({_rate_label(rate)}) to the run's {run} steps "
                         f"by ({steps}/{run})^{measured.get('exponent', 0):.2g}")
            lines.append(f"**{'Chosen' if result.get('status') == 'finished' else 'Best so far'}: "
                         f"{_rate_label(result['chosen_rate'])}**{moved} (held-out loss at the pilot's horizon "
                         f"{result.get('chosen_eval_loss'):.3f}); spent {format_duration(result.get('spent_s'))} of a "
                         f"{format_duration(result.get('budget_s'))} budget.")
        if result.get("note"):
            lines.append(f"*{result['note']}*")
    failed = next((e for e in reversed(events) if e.get("event") == "failed"), None)
    if failed:
        lines.append(f"**The pilot failed:** {failed.get('error')}")
    return "\n\n".join(lines)
