"""Every run in a runs folder as one more calibration point: the plan's memory estimate beside the measured peak.

Each run's `started` event carries the planner's estimate for the device it trained on and every `log`
carries the measured memory (trainer.memwatch); the run history keeps both (trainer.status.RunStatus). This
prints, run by run, what was estimated, what was measured and the error, then the median |error| per kind
(GPU: the estimate's peak against torch.cuda.max_memory_allocated of the largest rank; CPU: the node's host RAM
estimate against the trainer's peak RSS).

The estimate sizes every sequence at the plan's seq_len (what the GPU must hold when the longest batch
comes); a run whose data is shorter measures less than that.

Run: python bench/memory_runs.py [RUNS_DIR] [--write-results]   (default: the runs folder `tunewise runs`
uses; --write-results replaces its section of bench/RESULTS.md)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advisor.errors import TunewiseError  # noqa: E402
from advisor.plan import Plan  # noqa: E402
from trainer.status import list_runs  # noqa: E402


def setup_text(run_dir: str | Path) -> str:
    """The plan's memory-relevant settings in a few words: method, micro-batch x tokens, packing, checkpointing."""
    try:
        plan = Plan.load(Path(run_dir) / "plan.yaml")
    except (TunewiseError, OSError):
        return "-"
    t, m = plan.training, plan.method
    return (f"{m.method} mb{t.micro_batch} x {t.seq_len}" + (" packed" if plan.data.packing else "")
            + (" ckpt" if m.gradient_checkpointing else ""))


def rows(runs_dir: str | Path | None = None) -> list[dict]:
    """One dict per run that has both an estimate and a measured peak."""
    found = []
    for status in list_runs(runs_dir):
        if status.memory_estimate_bytes and status.memory_measured_bytes:
            error = 100.0 * (status.memory_estimate_bytes - status.memory_measured_bytes) / status.memory_measured_bytes
            found.append({"run_id": status.run_id, "what": setup_text(status.run_dir), "kind": status.memory_kind,
                          "state": status.state, "estimate": status.memory_estimate_bytes,
                          "measured": status.memory_measured_bytes, "error": error})
    return found


def main(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    write = "--write-results" in args
    args = [a for a in args if a != "--write-results"]
    found = rows(args[0] if args else None)
    lines = ["| run | setup | kind | state | estimate GB | measured GB | error |", "|---|---|---|---|---|---|---|"]
    for row in found:
        lines.append(f"| {row['run_id']} | {row['what']} | {row['kind']} | {row['state']} | {row['estimate'] / 1e9:.3f} | "
                     f"{row['measured'] / 1e9:.3f} | {row['error']:+.1f}% |")
    lines.append("")
    for kind in sorted({row["kind"] for row in found}):
        errors = [abs(row["error"]) for row in found if row["kind"] == kind]
        lines.append(f"{kind}: median |error| {statistics.median(errors):.1f}%, worst {max(errors):.1f}% over {len(errors)} runs")
    if not found:
        lines.append("no run with both an estimate and a measured peak yet")
    text = "\n".join(lines)
    print(text)
    if write:
        from bench.results import write_section

        write_section("memory_runs", text)
    return text


if __name__ == "__main__":
    main()
