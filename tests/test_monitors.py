"""The preference monitors (KL explosion, reward hacking, mode collapse).

Synthetic metric streams first: each monitor fires on the stream built to
trip it, with the numbers in the alert, and stays quiet on a healthy one.
Then a real DPO run at a huge learning rate and tiny beta, which must raise a
KL-explosion alert in its events.jsonl, against a gentle run that raises none.
"""

from __future__ import annotations

import math

import pytest

from test_preference import tiny_preference_setup  # noqa: F401  (session fixture)
from trainer.events import EventWriter, read_all_events
from trainer.monitors import (
    KLExplosionMonitor,
    ModeCollapseMonitor,
    MonitoredEvents,
    PreferenceMonitors,
    RewardHackingMonitor,
)


def feed(monitor, stream):
    alerts = []
    for step, metrics in stream:
        alerts += monitor.update(step, metrics)
    return alerts


# -- KL explosion ---------------------------------------------------------------------------------

def test_kl_limit_fires_once_with_numbers():
    monitor = KLExplosionMonitor(kl_limit=10.0, kl_rate_limit=100.0)
    stream = [(s, {"objective/kl": kl}) for s, kl in [(1, 1.0), (2, 4.0), (3, 11.0), (4, 12.0), (5, 13.0)]]
    alerts = feed(monitor, stream)
    assert [a.step for a in alerts] == [3]  # first crossing only, not every step above
    assert alerts[0].monitor == "kl_explosion"
    assert alerts[0].numbers["kl"] == 11.0 and alerts[0].numbers["kl_limit"] == 10.0
    assert "11.00" in alerts[0].message and "limit" in alerts[0].message


def test_kl_rate_fires_on_fast_growth_quiet_on_slow():
    fast = KLExplosionMonitor(kl_limit=1e9, kl_rate_limit=2.0)
    # 0.5 nats per step is 5 nats per 10 steps, over the 2.0 limit.
    alerts = feed(fast, [(s, {"kl_sequence": 0.5 * s}) for s in range(0, 12, 2)])
    assert alerts and alerts[0].numbers["kl_rate"] == pytest.approx(5.0)
    slow = KLExplosionMonitor(kl_limit=1e9, kl_rate_limit=2.0)
    assert feed(slow, [(s, {"kl_sequence": 0.1 * s}) for s in range(0, 40, 2)]) == []


def test_kl_stop_flag_follows_plan():
    monitor = KLExplosionMonitor(kl_limit=1.0, kl_rate_limit=100.0, stop_on_alert=True)
    (alert,) = feed(monitor, [(1, {"objective/kl": 2.0})])
    assert alert.stop is True


# -- reward hacking -------------------------------------------------------------------------------

def test_reward_hacking_on_falling_heldout_accuracy():
    monitor = RewardHackingMonitor(kl_budget=1e9)
    stream = []
    for step, (reward, accuracy) in enumerate([(0.1, 0.70), (0.3, 0.75), (0.6, 0.72), (0.9, 0.66), (1.2, 0.60)]):
        stream.append((step * 10, {"objective/scores": reward}))
        stream.append((step * 10, {"heldout_accuracy": accuracy}))
    alerts = feed(monitor, stream)
    assert len(alerts) == 1 and alerts[0].monitor == "reward_hacking"
    # Best accuracy 0.75 at step 10 (reward 0.3); fires when accuracy is 0.1 or more below it: 0.60 at step 40.
    assert alerts[0].step == 40
    assert alerts[0].numbers["best_accuracy"] == 0.75 and alerts[0].numbers["heldout_accuracy"] == 0.60
    assert alerts[0].numbers["reward_from"] == 0.3 and alerts[0].numbers["reward"] == 1.2


def test_reward_hacking_on_rising_original_loss_and_kl_budget():
    monitor = RewardHackingMonitor(kl_budget=6.0)
    stream = [
        (0, {"original_loss": 2.0}),
        (1, {"objective/scores": 0.0, "objective/kl": 0.0}),
        (5, {"objective/scores": 0.5, "objective/kl": 3.0, "original_loss": 2.05}),
        (9, {"objective/scores": 1.0, "objective/kl": 7.0, "original_loss": 2.3}),
    ]
    alerts = feed(monitor, stream)
    assert sorted(a.numbers.get("kl_budget", 0) for a in alerts) == [0, 6.0]
    loss_alert = next(a for a in alerts if "original_loss" in a.numbers)
    assert loss_alert.numbers["rise_pct"] == pytest.approx(15.0)


def test_reward_hacking_quiet_when_checks_improve_with_reward():
    monitor = RewardHackingMonitor(kl_budget=6.0)
    stream = []
    for step in range(10):
        stream.append((step, {"objective/scores": 0.1 * step, "objective/kl": 0.3 * step,
                              "heldout_accuracy": 0.6 + 0.02 * step, "original_loss": 2.0 + 0.001 * step}))
    assert feed(monitor, stream) == []


def test_reward_falling_with_accuracy_is_not_hacking():
    monitor = RewardHackingMonitor(kl_budget=6.0)
    stream = [(s, {"reward": 1.0 - 0.1 * s, "heldout_accuracy": 0.9 - 0.05 * s}) for s in range(6)]
    assert feed(monitor, stream) == []


# -- mode collapse --------------------------------------------------------------------------------

def test_mode_collapse_fires_on_repetitive_samples():
    monitor = ModeCollapseMonitor(diversity_drop_pct=50.0)
    stream = [(s, {"distinct_1": d1, "distinct_2": d2, "entropy": h})
              for s, d1, d2, h in [(0, 0.8, 0.95, 3.0), (10, 0.6, 0.8, 2.5), (20, 0.3, 0.4, 1.0), (30, 0.2, 0.3, 0.5)]]
    alerts = feed(monitor, stream)
    assert [a.step for a in alerts] == [20]
    assert alerts[0].numbers["distinct_2_start"] == 0.95 and alerts[0].numbers["distinct_2"] == 0.4
    assert "repetitive" in alerts[0].message


def test_mode_collapse_quiet_on_steady_diversity():
    monitor = ModeCollapseMonitor(diversity_drop_pct=50.0)
    stream = [(s, {"distinct_1": 0.8 - 0.01 * i, "distinct_2": 0.9, "entropy": 3.0 - 0.05 * i})
              for i, s in enumerate(range(0, 100, 10))]
    assert feed(monitor, stream) == []


# -- wiring into the event log --------------------------------------------------------------------

def test_monitored_events_write_alerts_and_stop_file(tmp_path):
    from advisor.plan import Plan
    from trainer.context import RunContext

    writer = EventWriter(tmp_path / "events.jsonl")
    monitors = PreferenceMonitors(kl_limit=5.0, kl_rate_limit=1e9, kl_budget=1e9, diversity_drop_pct=50.0,
                                  stop_on_alert=True)
    ctx = RunContext(plan=Plan(), run_dir=tmp_path, events=writer)
    events = MonitoredEvents(writer, monitors, ctx=ctx)
    events.emit("log", step=1, **{"objective/kl": 1.0, "objective/scores": 0.0})
    assert not (tmp_path / "STOP").exists()
    events.emit("log", step=2, **{"objective/kl": 8.0, "objective/scores": 0.5})
    records = read_all_events(tmp_path / "events.jsonl")
    assert [r["event"] for r in records] == ["log", "log", "alert"]
    alert = records[-1]
    assert alert["kind"] == "kl_explosion" and alert["action"] == "stop" and alert["step"] == 2 and alert["kl"] == 8.0
    assert (tmp_path / "STOP").exists()
    # The stop goes through callbacks.request_stop: the STOP file says why, and the run's stop flag is up.
    assert (tmp_path / "STOP").read_text(encoding="utf-8").strip() == alert["message"]
    assert ctx.stop_requested()
    assert events.path == writer.path  # delegates everything else


# -- a real run built to trip the KL monitor ------------------------------------------------------

@pytest.mark.slow
def test_real_dpo_runs_kl_explosion_vs_gentle(tmp_path, tiny_preference_setup):
    from test_preference import run_stage

    common = {"training.max_steps": 6, "preference.sample_every": 2, "preference.kl_limit": 1.0,
              "preference.kl_rate_limit": 1e6, "preference.num_samples": 4, "preference.max_new_tokens": 12}
    wild = run_stage(tmp_path / "wild", tiny_preference_setup, "dpo",
                     {**common, "training.learning_rate": 0.05, "preference.beta": 0.01, "method.method": "full"})
    gentle = run_stage(tmp_path / "gentle", tiny_preference_setup, "dpo",
                       {**common, "training.learning_rate": 1e-5, "preference.beta": 0.5, "method.method": "full"})
    wild_alerts = [e for e in wild if e["event"] == "alert" and e["kind"] == "kl_explosion"]
    gentle_alerts = [e for e in gentle if e["event"] == "alert"]
    wild_kl = [e["kl_sequence"] for e in wild if e["event"] == "sample"]
    gentle_kl = [e["kl_sequence"] for e in gentle if e["event"] == "sample"]
    assert wild_alerts, f"no KL alert; KL went {wild_kl}"
    assert wild_alerts[0]["kl"] > 1.0
    assert gentle_alerts == [], f"gentle run alerted: {gentle_alerts}; KL went {gentle_kl}"
    assert max(gentle_kl) < 1.0 and all(math.isfinite(k) for k in gentle_kl)


def test_a_flat_noisy_run_never_fires_reward_hacking():
    """A reward that only jitters (+0.01 here and there), a held-out accuracy flipping one of 8 pairs, an
    original-domain loss within 1% and a small KL: nothing the run's own noise does not explain."""
    import random

    rng = random.Random(0)
    monitor = RewardHackingMonitor(kl_budget=6.0)
    stream = []
    for step in range(0, 400, 4):
        stream.append((step, {"reward": 0.5 + rng.gauss(0, 0.01), "kl": 0.05 + rng.random() * 0.02,
                              "heldout_accuracy": rng.choice([0.5, 0.625, 0.75]), "heldout_pairs": 8,
                              "original_loss": 2.0 * (1 + rng.uniform(-0.01, 0.01))}))
    assert feed(monitor, stream) == []


def test_reward_hacking_still_fires_when_the_rise_and_the_fall_stand_out_of_the_noise():
    monitor = RewardHackingMonitor(kl_budget=6.0)
    stream = [(s, {"reward": 0.5 + 0.002 * (s % 3), "heldout_accuracy": 0.8, "heldout_pairs": 200}) for s in range(8)]
    stream += [(8 + s, {"reward": 0.6 + 0.1 * s, "heldout_accuracy": 0.8 - 0.05 * s, "heldout_pairs": 200})
               for s in range(6)]
    (alert,) = feed(monitor, stream)
    assert alert.monitor == "reward_hacking" and alert.numbers["best_accuracy"] == 0.8
