"""What a training stage receives: the plan, its run directory, the event writer,
where to resume from, and how to tell that a stop was requested.

The run directory it works in is described in trainer/rundir.py.

A stage module exposes `run(ctx) -> dict`; the dict has at least
`status` ("finished" or "stopped"), optionally `reason`, `output_dir` and
key metrics. Exceptions mean failure: the runner records `failed`. The
policy stages (DPO, PPO / RLOO / GRPO) build theirs with `stage_result`.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from advisor.plan import Plan
from trainer.events import EventWriter
from trainer.rundir import CHECKPOINTS_DIR, STOP_FILE, output_dir


@dataclass
class RunContext:
    plan: Plan
    """The validated plan."""
    run_dir: Path
    """This run's directory."""
    events: EventWriter
    """Writer for events.jsonl."""
    resume_from: Path | None = None
    """A checkpoint directory to continue from (None: start fresh)."""
    rank: int = 0
    """Process rank under `accelerate launch` (only rank 0 writes events)."""
    measure_only: bool = False
    """A learning-rate pilot's candidate (trainer/pilot.py): train and evaluate, but save no output and take
    no policy samples; the held-out loss is the result."""
    _signalled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def output_dir(self) -> Path:
        """Where the stage saves its final adapter or model (trainer.rundir.output_dir)."""
        return output_dir(self.run_dir, self.plan.output)

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    def stop_requested(self) -> bool:
        """True once the user asked to stop (STOP file or SIGTERM/SIGINT)."""
        return self._signalled.is_set() or (self.run_dir / STOP_FILE).exists()

    def install_signal_handlers(self) -> None:
        """Turn SIGTERM/SIGINT into a cooperative stop request (main thread only)."""

        def handler(signum, frame):
            self._signalled.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def emit(self, event: str, step: int | None = None, **fields):
        """Write an event (rank 0 only; other ranks stay silent)."""
        if self.rank == 0:
            return self.events.emit(event, step=step, **fields)
        return None


#: The held-out numbers of a policy stage's last `sample` event that its result carries (the
#: pipeline's comparison report reads these).
SAMPLE_RESULT_KEYS = ("heldout_accuracy", "kl", "kl_sequence", "reward", "reward_source")


def stage_result(ctx: RunContext, stopped: bool, forgetting, samples: list[dict], **fields) -> dict:
    """What a policy stage returns: its status, its own `fields`, the last policy sample's held-out
    numbers (`SAMPLE_RESULT_KEYS`), the alert count and the forgetting monitor's summary.

    `stopped`: the stage's trainer ended early on its own; a stop request or the forgetting monitor
    (`forgetting.stop_reason()`) also count. `forgetting` is the stage's `trainer.forgetting.Forgetting`,
    `samples` its sampler's history. A stopped result says why: the forgetting monitor's reason, else
    the first alert that asked to stop, else "stop requested".
    """
    stop_reason = forgetting.stop_reason()
    stopped = stopped or ctx.stop_requested() or stop_reason is not None
    last = samples[-1] if samples else {}
    result = {
        "status": "stopped" if stopped else "finished",
        "output_dir": str(ctx.output_dir),
        **fields,
        **{key: last.get(key) for key in SAMPLE_RESULT_KEYS},
        "alerts": len(ctx.events.alerts),
    }
    if stopped:
        result["reason"] = stop_reason or next((a.message for a in ctx.events.alerts if a.stop), "stop requested")
    result.update(forgetting.summary())
    return result
