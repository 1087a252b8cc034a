"""The guide's "Common Issues" for preference training, watched while a run goes.

Three monitors, each pure logic fed one metric dict at a time (the fields of
a `log`, `sample`, `eval` or `forgetting` event), each returning an `Alert`
when its condition starts to hold:

- `KLExplosionMonitor`: the KL to the reference is above `kl_limit`, or grows
  faster than `kl_rate_limit` nats per 10 steps.
- `RewardHackingMonitor`: the reward keeps rising while a check the reward
  model cannot game gets worse: held-out preference accuracy falls, the
  forgetting monitor's original-domain loss rises, or the KL leaves its
  budget (`target_kl`).
- `ModeCollapseMonitor`: distinct-1 / distinct-2 or the mean token entropy of
  sampled completions falls more than `diversity_drop_pct` below its first
  measurement.

KL here is the per-sequence KL in nats (the sum over a completion's tokens,
averaged over completions), the scale of TRL's `objective/kl` and of the
plan's `kl_limit` / `target_kl`. A DPO run's `sample` events carry it as
`kl_sequence` (their `kl` is the per-token mean).

`PreferenceMonitors` bundles the three for a plan; `MonitoredEvents` wraps a
run's `EventWriter` so every event written is also fed to the monitors and
alerts are written right after the event that caused them (an `alert`
event: `kind` (kl_explosion, reward_hacking, mode_collapse), `message` in
plain language, `action` (warn or stop) and the numbers). When the
plan says `stop_on_alert`, a KL-explosion alert also requests a cooperative
stop with `trainer.callbacks.request_stop` (the STOP file, holding the
alert's message as the reason). `monitored_context(ctx)` is how a
preference stage installs them.

No torch imports at module level: the UI and tests use this without a model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

#: Metric names that carry each quantity, first match wins. Stable across
#: stages: PPO (TRL's objective/*), RLOO/GRPO (kl, reward), our `sample`
#: events (kl_sequence, reward), reward-model and DPO evals.
KL_KEYS = ("objective/kl", "kl_sequence")
REWARD_KEYS = ("objective/scores", "reward")
ACCURACY_KEYS = ("heldout_accuracy", "eval_accuracy", "eval_rewards/accuracies")
ORIGINAL_LOSS_KEYS = ("original_loss", "eval_loss_original")
DIVERSITY_KEYS = ("distinct_1", "distinct_2", "entropy")


@dataclass(frozen=True)
class Alert:
    """One alert: which monitor, what happened in words, and the numbers behind it."""

    monitor: str
    """kl_explosion, reward_hacking or mode_collapse."""
    message: str
    """A plain-language sentence saying what was seen and what to do."""
    step: int
    """The optimizer step at which it fired."""
    numbers: dict = field(default_factory=dict)
    """The values that triggered it (names as in the events)."""
    stop: bool = False
    """True when the plan asks to stop the run on this alert."""

    def event_fields(self) -> dict:
        """Fields for `EventWriter.emit("alert", step=..., **fields)`."""
        return {"kind": self.monitor, "message": self.message, "action": "stop" if self.stop else "warn",
                **self.numbers}


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _first(metrics: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    for key in keys:
        value = _number(metrics.get(key))
        if value is not None:
            return value
    return None


class _Stream:
    """Reads one quantity from metric dicts, locked to the first key that carried it.

    A PPO run reports KL both as TRL's `objective/kl` (training rollouts) and as our
    `kl_sequence` (held-out samples): two estimators on different prompts. Following
    only the first one seen keeps a trend from mixing them.
    """

    def __init__(self, keys: Iterable[str]):
        self.keys = tuple(keys)
        self.key: str | None = None

    def read(self, metrics: Mapping[str, Any]) -> float | None:
        if self.key is None:
            for key in self.keys:
                if _number(metrics.get(key)) is not None:
                    self.key = key
                    break
            else:
                return None
        return _number(metrics.get(self.key))


class KLExplosionMonitor:
    """KL above a limit, or KL growing faster than a rate (nats per 10 steps)."""

    def __init__(self, kl_limit: float, kl_rate_limit: float, stop_on_alert: bool = False, window_steps: int = 10):
        self.kl_limit = kl_limit
        self.kl_rate_limit = kl_rate_limit
        self.stop_on_alert = stop_on_alert
        self.window_steps = window_steps
        self.history: list[tuple[int, float]] = []
        self.kl_stream = _Stream(KL_KEYS)
        self._over_limit = False
        self._too_fast = False

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Alert]:
        kl = self.kl_stream.read(metrics)
        if kl is None:
            return []
        self.history.append((step, kl))
        alerts = []
        over = kl > self.kl_limit
        if over and not self._over_limit:
            alerts.append(Alert(
                "kl_explosion",
                f"KL explosion: the policy's KL to the reference is {kl:.2f} nats at step {step}, above the limit of "
                f"{self.kl_limit:g}. The model is drifting far from where it started; lower the learning rate, "
                f"raise beta / the KL coefficient, or stop and keep an earlier checkpoint.",
                step, {"kl": kl, "kl_limit": self.kl_limit}, self.stop_on_alert,
            ))
        self._over_limit = over
        # Growth rate: the change since the oldest point within the last `window_steps` steps, scaled to
        # nats per 10 steps. Comparing over a window rather than step to step keeps one noisy sample from firing.
        window = [(s, v) for s, v in self.history if step - s <= self.window_steps and s < step]
        fast = False
        if window:
            old_step, old_kl = window[0]
            rate = (kl - old_kl) / (step - old_step) * 10.0
            fast = rate > self.kl_rate_limit
            if fast and not self._too_fast:
                alerts.append(Alert(
                    "kl_explosion",
                    f"KL explosion: the KL to the reference grew from {old_kl:.2f} to {kl:.2f} nats between steps "
                    f"{old_step} and {step} ({rate:.2f} nats per 10 steps, limit {self.kl_rate_limit:g}). Lower the "
                    f"learning rate or raise beta / the KL coefficient.",
                    step, {"kl": kl, "kl_rate": rate, "kl_rate_limit": self.kl_rate_limit,
                           "kl_from": old_kl, "step_from": old_step}, self.stop_on_alert,
                ))
        self._too_fast = fast
        return alerts


#: How many standard deviations of its own step-to-step changes the reward must rise by to count as rising,
#: and how many standard errors a held-out accuracy must fall by to count as falling (see RewardHackingMonitor).
REWARD_NOISE_SIGMAS = 3.0
ACCURACY_NOISE_SIGMAS = 2.0


class RewardHackingMonitor:
    """Reward still rising while an independent check worsens, or while KL is over its budget.

    The checks: held-out preference accuracy (a fall of `accuracy_drop` or more from its best),
    original-domain loss (a rise of `loss_rise_pct` % or more above its best), and KL above
    `kl_budget`. "Rising" means the latest reward is above the reward seen when the check was at
    its best (or, for the KL budget, above the first reward) by more than `min_reward_gain`.

    Both judgements are relative to the run's own noise, so a flat run never fires: the reward must
    rise by more than REWARD_NOISE_SIGMAS standard deviations of its step-to-step changes (once three
    changes are known), and the accuracy must fall by more than ACCURACY_NOISE_SIGMAS standard errors
    of the difference of two shares measured on the sample's `heldout_pairs` (sqrt(2 p (1 - p) / n):
    with 8 held-out pairs one flipped pair is a 12.5-point fall, well inside the noise).
    """

    def __init__(self, kl_budget: float, accuracy_drop: float = 0.1, loss_rise_pct: float = 5.0,
                 min_reward_gain: float = 0.0):
        self.kl_budget = kl_budget
        self.accuracy_drop = accuracy_drop
        self.loss_rise_pct = loss_rise_pct
        self.min_reward_gain = min_reward_gain
        self.rewards: list[tuple[int, float]] = []
        self.reward_stream = _Stream(REWARD_KEYS)
        self.kl_stream = _Stream(KL_KEYS)
        self.best_accuracy: tuple[int, float] | None = None
        self.best_loss: tuple[int, float] | None = None
        self._fired: set[str] = set()

    def _reward_noise(self) -> float:
        """REWARD_NOISE_SIGMAS x the standard deviation of the reward's step-to-step changes (0 before three)."""
        changes = [b - a for (_, a), (_, b) in zip(self.rewards, self.rewards[1:])]
        if len(changes) < 3:
            return 0.0
        mean = sum(changes) / len(changes)
        return REWARD_NOISE_SIGMAS * math.sqrt(sum((c - mean) ** 2 for c in changes) / (len(changes) - 1))

    def _rose(self, now: float, then: float) -> bool:
        return now - then > max(self.min_reward_gain, self._reward_noise())

    def _reward_at(self, step: int) -> float | None:
        """The latest reward logged at or before `step` (the first one if none was)."""
        earlier = [r for s, r in self.rewards if s <= step]
        if earlier:
            return earlier[-1]
        return self.rewards[0][1] if self.rewards else None

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Alert]:
        reward = self.reward_stream.read(metrics)
        if reward is not None:
            self.rewards.append((step, reward))
        if not self.rewards:
            # Record the checks' baselines even before any reward arrives.
            self._track(step, metrics)
            return []
        now = self.rewards[-1][1]
        alerts = []

        accuracy = _first(metrics, ACCURACY_KEYS)
        if accuracy is not None:
            if self.best_accuracy is None or accuracy >= self.best_accuracy[1]:
                self.best_accuracy = (step, accuracy)
            best_step, best = self.best_accuracy
            then = self._reward_at(best_step)
            pairs = metrics.get("heldout_pairs")
            noise = (ACCURACY_NOISE_SIGMAS * math.sqrt(2 * best * (1 - best) / pairs)
                     if isinstance(pairs, int) and pairs > 0 else 0.0)
            if best - accuracy >= max(self.accuracy_drop, noise) and self._rose(now, then):
                alerts += self._fire("accuracy", Alert(
                    "reward_hacking",
                    f"Possible reward hacking: the reward rose from {then:.3f} to {now:.3f} while held-out preference "
                    f"accuracy fell from {best:.3f} (step {best_step}) to {accuracy:.3f}. The policy may be exploiting "
                    f"the reward signal rather than getting better; stop and keep the checkpoint from step {best_step}.",
                    step, {"reward": now, "reward_from": then, "heldout_accuracy": accuracy,
                           "best_accuracy": best, "best_step": best_step},
                ))

        loss = _first(metrics, ORIGINAL_LOSS_KEYS)
        if loss is not None:
            if self.best_loss is None or loss <= self.best_loss[1]:
                self.best_loss = (step, loss)
            best_step, best = self.best_loss
            then = self._reward_at(best_step)
            rise_pct = (loss - best) / best * 100.0 if best > 0 else 0.0
            if rise_pct >= self.loss_rise_pct and self._rose(now, then):
                alerts += self._fire("original_loss", Alert(
                    "reward_hacking",
                    f"Possible reward hacking: the reward rose from {then:.3f} to {now:.3f} while the original-domain "
                    f"loss rose {rise_pct:.1f}% (from {best:.3f} to {loss:.3f}). The model is trading general ability "
                    f"for reward; lower the learning rate or raise the KL penalty.",
                    step, {"reward": now, "reward_from": then, "original_loss": loss,
                           "best_original_loss": best, "rise_pct": rise_pct},
                ))

        kl = self.kl_stream.read(metrics)
        if kl is not None:
            first = self.rewards[0][1]
            if kl > self.kl_budget and self._rose(now, first):
                alerts += self._fire("kl_budget", Alert(
                    "reward_hacking",
                    f"Possible reward hacking: the reward rose from {first:.3f} to {now:.3f} with the KL at {kl:.2f} "
                    f"nats, beyond its budget of {self.kl_budget:g}. Gains this far from the reference are often the "
                    f"reward model's flaws being exploited; raise the KL coefficient / beta.",
                    step, {"reward": now, "reward_from": first, "kl": kl, "kl_budget": self.kl_budget},
                ))
        return alerts

    def _track(self, step: int, metrics: Mapping[str, Any]) -> None:
        accuracy = _first(metrics, ACCURACY_KEYS)
        if accuracy is not None and (self.best_accuracy is None or accuracy >= self.best_accuracy[1]):
            self.best_accuracy = (step, accuracy)
        loss = _first(metrics, ORIGINAL_LOSS_KEYS)
        if loss is not None and (self.best_loss is None or loss <= self.best_loss[1]):
            self.best_loss = (step, loss)

    def _fire(self, check: str, alert: Alert) -> list[Alert]:
        """Each check alerts once per run: the first crossing is the news."""
        if check in self._fired:
            return []
        self._fired.add(check)
        return [alert]


class ModeCollapseMonitor:
    """Sample diversity (distinct-1, distinct-2, mean token entropy) falling far below its start."""

    def __init__(self, diversity_drop_pct: float):
        self.drop_pct = diversity_drop_pct
        self.baseline: dict[str, float] = {}
        self._collapsed = False

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Alert]:
        values = {key: _first(metrics, (key,)) for key in DIVERSITY_KEYS}
        values = {key: value for key, value in values.items() if value is not None}
        if not values:
            return []
        for key, value in values.items():
            self.baseline.setdefault(key, value)
        # Each measure's fall relative to its first measurement, in percent.
        drops = {
            key: (self.baseline[key] - value) / self.baseline[key] * 100.0
            for key, value in values.items() if self.baseline[key] > 0
        }
        fallen = {key: pct for key, pct in drops.items() if pct >= self.drop_pct}
        collapsed = bool(fallen)
        alerts = []
        if collapsed and not self._collapsed:
            described = ", ".join(
                f"{key} {self.baseline[key]:.3f} -> {values[key]:.3f} (-{pct:.0f}%)" for key, pct in fallen.items()
            )
            numbers = {key: values[key] for key in values}
            numbers.update({f"{key}_start": self.baseline[key] for key in values})
            numbers["diversity_drop_pct"] = self.drop_pct
            alerts.append(Alert(
                "mode_collapse",
                f"Mode collapse: sampled completions are becoming repetitive ({described}; alert at "
                f"-{self.drop_pct:g}%). Lower the learning rate, raise beta / the KL coefficient, or stop early.",
                step, numbers,
            ))
        self._collapsed = collapsed
        return alerts


class PreferenceMonitors:
    """The three monitors configured from a plan's `preference` settings."""

    def __init__(self, kl_limit: float, kl_rate_limit: float, kl_budget: float, diversity_drop_pct: float,
                 stop_on_alert: bool = False):
        self.kl = KLExplosionMonitor(kl_limit, kl_rate_limit, stop_on_alert)
        self.hacking = RewardHackingMonitor(kl_budget)
        self.collapse = ModeCollapseMonitor(diversity_drop_pct)

    @classmethod
    def from_plan(cls, plan) -> "PreferenceMonitors":
        pref = plan.preference
        return cls(pref.kl_limit, pref.kl_rate_limit, pref.target_kl, pref.diversity_drop_pct, pref.stop_on_alert)

    def observe(self, step: int, metrics: Mapping[str, Any]) -> list[Alert]:
        """Feed one metric dict (an event's fields); returns the alerts it set off."""
        return (self.kl.update(step, metrics) + self.hacking.update(step, metrics)
                + self.collapse.update(step, metrics))


#: Event kinds whose fields the monitors read.
OBSERVED_EVENTS = ("log", "sample", "eval", "forgetting")


class MonitoredEvents:
    """Wraps an `EventWriter`: every event written also goes through the monitors.

    Alerts are written as `alert` events straight after the event that caused
    them. An alert with `stop` set asks the run in `ctx` to stop
    (`trainer.callbacks.request_stop(ctx, alert.message)`), which the stop
    callback turns into a cooperative stop. Anything else is delegated to the
    wrapped writer, so it can replace `ctx.events`.
    """

    def __init__(self, inner, monitors: PreferenceMonitors, ctx=None):
        self.inner = inner
        self.monitors = monitors
        self.ctx = ctx
        self.alerts: list[Alert] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def emit(self, event: str, step: int | None = None, **fields: Any) -> dict:
        record = self.inner.emit(event, step=step, **fields)
        if event in OBSERVED_EVENTS:
            metrics = record
            if event == "forgetting" and "loss" in record:
                # The forgetting monitor's `loss` is the original-domain loss, not the training loss.
                metrics = {"original_loss": record["loss"]}
            for alert in self.monitors.observe(int(record.get("step") or 0), metrics):
                self.alerts.append(alert)
                self.inner.emit("alert", step=alert.step, **alert.event_fields())
                if alert.stop and self.ctx is not None:
                    from trainer.callbacks import request_stop  # imports transformers: only when stopping

                    request_stop(self.ctx, alert.message)
        return record


def monitored_context(ctx):
    """A copy of `ctx` whose event writer feeds the preference monitors configured from its plan.

    The copy shares the original's run directory and stop flag, so a stop the monitors request
    reaches the stage's stop callback. A context that is already monitored is returned as it is.
    """
    if isinstance(ctx.events, MonitoredEvents):
        return ctx
    events = MonitoredEvents(ctx.events, PreferenceMonitors.from_plan(ctx.plan), ctx=ctx)
    return dataclasses.replace(ctx, events=events)
