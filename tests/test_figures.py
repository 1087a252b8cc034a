"""figures.py: charts built from synthetic event lists have the right traces and points."""

from __future__ import annotations

import figures


def _log(step, **fields):
    return {"event": "log", "time": 100.0 + step, "step": step, **fields}


def test_loss_figure_has_training_eval_and_lr_traces():
    events = [{"event": "started", "time": 100.0, "step": 0},
              {"event": "train_begin", "time": 100.0, "step": 0, "max_steps": 4}]
    events += [_log(s, loss=3.0 - 0.5 * s, learning_rate=1e-4 * s) for s in (1, 2, 3)]
    events.append({"event": "eval", "time": 104.0, "step": 3, "eval_loss": 1.9})
    fig = figures.loss_figure(events)
    names = [t.name for t in fig.data]
    assert names == ["training loss", "eval loss", "learning rate"]
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == [2.5, 2.0, 1.5]
    assert list(fig.data[1].y) == [1.9]
    assert fig.data[2].yaxis == "y2"
    assert fig.layout.yaxis.title.text == "loss" and fig.layout.yaxis2.title.text == "learning rate"


def test_loss_figure_shows_the_ewc_penalty_when_the_safeguard_is_on():
    events = [_log(s, loss=2.0, learning_rate=1e-4, ewc_penalty=0.01 * s) for s in (1, 2)]
    fig = figures.loss_figure(events)
    assert [t.name for t in fig.data] == ["training loss", "EWC penalty (part of the loss)", "learning rate"]
    assert list(fig.data[1].y) == [0.01, 0.02]


def test_loss_figure_without_points_is_a_waiting_note():
    fig = figures.loss_figure([{"event": "started", "time": 1.0, "step": 0}])
    assert len(fig.data) == 0
    assert "Waiting" in fig.layout.annotations[0].text


def test_dpo_reward_and_kl_come_from_sample_events():
    # DPO: implicit-reward margins every step; every 2 steps a `sample` event with the sampled KL and reward.
    events = [_log(s, **{"rewards/margins": 0.1 * s}) for s in (1, 2, 3, 4)]
    events += [{"event": "sample", "time": 0.0, "step": s, "kl_sequence": 0.5 * s, "kl": 0.01 * s, "reward": 0.2 * s}
               for s in (0, 2, 4)]
    over_time = figures.reward_kl_time_figure(events)
    # The key is named only where it says more than the word ("reward (reward)" read as a stutter).
    assert [t.name for t in over_time.data] == ["reward", "KL (kl_sequence)", "DPO reward margin"]
    assert list(over_time.data[1].x) == [0, 2, 4] and list(over_time.data[1].y) == [0.0, 1.0, 2.0]
    frontier = figures.reward_vs_kl_figure(events)
    assert list(frontier.data[0].x) == [0.0, 1.0, 2.0]
    assert [round(v, 6) for v in frontier.data[0].y] == [0.0, 0.4, 0.8]


def test_reward_against_kl_pairs_kl_with_latest_reward_when_logged_apart():
    events = [_log(s, **{"rewards/margins": 0.1 * s}) for s in (1, 2, 3, 4)]
    events += [{"event": "sample", "time": 0.0, "step": s, "kl_sequence": 0.01 * s} for s in (0, 2, 4)]
    frontier = figures.reward_vs_kl_figure(events)
    # Step 0 has no reward yet, so only steps 2 and 4 are points.
    assert list(frontier.data[0].x) == [0.02, 0.04]
    assert [round(v, 6) for v in frontier.data[0].y] == [0.2, 0.4]


def test_ppo_keys_are_preferred_for_reward_and_kl():
    events = [_log(s, **{"objective/scores": 1.0 + s, "objective/kl": 0.5 * s, "objective/rlhf_reward": s})
              for s in (1, 2)]
    series = figures.reward_kl_series(events)
    assert series["reward_key"] == "objective/scores" and series["kl_key"] == "objective/kl"
    assert series["reward"] == ([1, 2], [2.0, 3.0])


def test_forgetting_figure_draws_baseline_and_threshold():
    events = [{"event": "forgetting", "time": 0.0, "step": s, "baseline_loss": 2.0, "loss": loss,
               "degradation_pct": (loss / 2.0 - 1) * 100, "threshold_pct": 20.0}
              for s, loss in ((0, 2.0), (10, 2.2), (20, 2.6))]
    fig = figures.forgetting_figure(events)
    assert [t.name for t in fig.data] == ["original-domain loss", "baseline 2.000", "threshold +20%"]
    assert list(fig.data[0].y) == [2.0, 2.2, 2.6]
    assert list(fig.data[2].y) == [2.4, 2.4]  # 2.0 x (1 + 20%)


def test_memory_figure_stacks_components_per_method():
    estimates = {"Full": {"weights": 2e9, "gradients": 2e9, "optimizer": 8e9},
                 "LoRA": {"weights": 2e9, "adapters": 1e7, "optimizer": 8e7}}
    fig = figures.memory_figure(estimates, gpu_bytes=int(24e9), gpu_label="RTX 4090")
    bars = {t.name: list(t.y) for t in fig.data if t.type == "bar"}
    assert bars["weights"] == [2.0, 2.0] and bars["gradients"] == [2.0, 0.0]
    assert fig.layout.barmode == "stack"
    totals = [t for t in fig.data if t.type == "scatter"][0]
    assert list(totals.text) == ["12.0 GB", "2.1 GB"]
    # A model under 1 GB (the demo) is drawn in MB.
    small = figures.memory_figure({"LoRA": {"weights": 3_500_000, "activations": 500_000}})
    assert [t for t in small.data if t.type == "scatter"][0].text == ("4.0 MB",)


def test_progress_and_time_left():
    events = [{"event": "started", "time": 100.0, "step": 0},
              {"event": "train_begin", "time": 110.0, "step": 0, "max_steps": 10},
              _log(4, loss=1.0)]
    progress = figures.run_progress(events, now=130.0)
    # 4 steps in 20 s since train_begin: 5 s per step, 6 steps left.
    assert (progress.step, progress.max_steps, progress.state) == (4, 10, "training")
    assert progress.eta_s == 30.0 and progress.fraction == 0.4 and progress.elapsed_s == 30.0
    stopped = figures.run_progress(events + [{"event": "stopped", "time": 140.0, "step": 4, "reason": "user"}], now=999)
    assert stopped.state == "stopped" and stopped.eta_s is None and stopped.reason == "user"
    assert figures.format_duration(3725) == "1 h 02 min" and figures.format_duration(75) == "1 min 15 s"


def test_overlay_and_alerts():
    runs = {"run a": [_log(1, loss=2.0), _log(2, loss=1.0)], "run b": [_log(1, loss=3.0)], "empty": []}
    fig = figures.overlay_figure(runs)
    assert [t.name for t in fig.data] == ["run a", "run b"]
    alerts = figures.alert_messages([{"event": "alert", "step": 7, "message": "KL above 10 nats"}])
    assert alerts == ["step 7: KL above 10 nats"]


def test_a_resumed_run_draws_one_loss_line_per_attempt():
    # Attempt 1 logs steps 1-12 and is killed; checkpoint-10 is resumed, which logs 11-14 again.
    events = [{"event": "started", "time": 100.0, "step": 0},
              {"event": "train_begin", "time": 100.0, "step": 0, "max_steps": 14}]
    events += [_log(s, loss=3.0 - 0.1 * s, learning_rate=1e-3) for s in range(1, 13)]
    events.append({"event": "eval", "time": 113.0, "step": 10, "eval_loss": 2.5})
    events.append({"event": "failed", "time": 114.0, "step": 12, "signal": 9})
    events.append({"event": "resumed", "time": 120.0, "step": 10, "checkpoint": "checkpoints/checkpoint-10"})
    events.append({"event": "train_begin", "time": 125.0, "step": 10, "max_steps": 14, "start_step": 10})
    events += [_log(s, loss=2.0 - 0.1 * s, learning_rate=1e-3) for s in range(11, 15)]
    events.append({"event": "eval", "time": 131.0, "step": 14, "eval_loss": 0.5})
    fig = figures.loss_figure(events)
    losses = [t for t in fig.data if t.name.startswith("training loss")]
    assert [t.name for t in losses] == ["training loss", "training loss (resumed at step 10)"]
    assert list(losses[0].x) == list(range(1, 13)) and list(losses[1].x) == [11, 12, 13, 14]
    assert list(losses[1].y) == [2.0 - 0.1 * s for s in range(11, 15)]
    assert losses[0].line.color != losses[1].line.color
    # Every line only goes forward in x; the eval and learning-rate lines split the same way, one legend entry each.
    assert all(list(t.x) == sorted(set(t.x)) for t in fig.data)
    evals = [t for t in fig.data if t.name == "eval loss"]
    assert [list(t.x) for t in evals] == [[10], [14]] and [t.showlegend for t in evals] == [True, False]
    lrs = [t for t in fig.data if t.name == "learning rate"]
    assert [len(t.x) for t in lrs] == [12, 4] and all(t.yaxis == "y2" for t in lrs)


def test_attempts_split_where_logged_steps_go_back_without_a_resumed_marker():
    # A `resumed` line lost to a damaged log (read as `corrupt`): the steps going back still split the run.
    events = [_log(s, loss=1.0) for s in (1, 2, 3, 4)] + [{"event": "corrupt", "offset": 0, "text": "{"}]
    events += [_log(s, loss=0.5) for s in (3, 4, 5)]
    parts = figures.attempts(events)
    assert [[e["step"] for e in part if e["event"] == "log"] for part in parts] == [[1, 2, 3, 4], [3, 4, 5]]
    fig = figures.loss_figure(events)
    assert [t.name for t in fig.data if t.name.startswith("training")] == [
        "training loss", "training loss (resumed at step 2)"]
    assert figures.attempts([]) == [[]] and len(figures.attempts(events[:4])) == 1


def test_after_a_resume_the_clock_runs_on_and_time_left_is_the_new_attempts():
    events = [
        {"event": "started", "time": 100.0, "step": 0},
        {"event": "train_begin", "time": 101.0, "step": 0, "max_steps": 20},
        *({"event": "log", "time": 101.0 + s, "step": s, "loss": 1.0} for s in range(1, 6)),
        {"event": "stopped", "time": 107.0, "step": 5, "reason": "stopped by the user"},
        {"event": "resumed", "time": 200.0, "step": 5},
        {"event": "started", "time": 201.0, "step": 5},
        {"event": "train_begin", "time": 202.0, "step": 5, "max_steps": 20},
        *({"event": "log", "time": 202.0 + 2 * (s - 5), "step": s, "loss": 0.9} for s in range(6, 11)),
    ]
    progress = figures.run_progress(events, now=212.0)
    assert progress.state == "training" and progress.step == 10
    assert progress.elapsed_s == 112.0  # from the run's first event, not frozen at the earlier stop
    assert progress.eta_s == 20.0  # 2 s per step in this attempt x 10 steps left


def test_the_banner_shows_the_trainers_notices_beside_the_alerts():
    events = [{"event": "notice", "time": 1.0, "step": 0, "message": "bf16 is not available on this CPU: training in fp32"},
              {"event": "notice", "time": 2.0, "step": 0, "message": "bf16 is not available on this CPU: training in fp32"},
              {"event": "alert", "time": 3.0, "step": 4, "stage": "ppo", "message": "KL explosion"}]
    text = figures.alerts_markdown(figures.alert_messages(events), figures.notice_messages(events))
    assert text.count("bf16 is not available") == 1 and "- **step 4 (ppo): KL explosion**" in text


def test_reward_against_kl_waits_for_a_second_point():
    start = [{"event": "sample", "time": 1.0, "step": 0, "reward": 0.1, "kl_sequence": 0.0}]
    assert not figures.reward_vs_kl_figure(start).data  # the empty figure: one dot at KL 0 is no trade-off
    later = start + [{"event": "sample", "time": 2.0, "step": 4, "reward": 0.3, "kl_sequence": 0.2}]
    assert len(figures.reward_vs_kl_figure(later).data[0].x) == 2
