"""The runs folder as the app sees it: uploads kept beside the runs, the history, demo clean-up, exports.

Everything here takes plain arguments (folders, limits, timeouts), never the app's configuration, so it
can be used and tested without a page. Nothing imports torch: a merge for export runs as a subprocess
(`python -m trainer.merge RUN_DIR`).

- Uploads: `keep_upload` copies a file Gradio received into `<runs>/_uploads/<stamp>/` under a
  sanitized name (`sanitize_filename`: no directories, no leading dots, only [A-Za-z0-9._-], the suffix
  kept); `is_upload` says whether a path is one of those copies (a run launched on one gets its own copy
  in its run directory, so cleaning old uploads never takes a run's data).
- `history(runs_dir, only)`: the runs, newest first, as trainer.status describes them (from the
  incremental digest of each events.jsonl, never re-read from the start); `active_runs(runs_dir)`.
- `cleanup_old_runs(runs_dir, uploads_dir, keep)`: the public demo's disk bound.
- `export(run_dir, into, reload_16bit, timeout_s)`: the run's tuned model as a zip archive in a folder
  of its own (never inside the runs folder, which the page does not serve).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from advisor.errors import DatasetError, TunewiseError
from advisor.profile import SUFFIX_FORMATS
from trainer.procs import REPO_ROOT, child_env
from trainer.rundir import final_output
from trainer.status import ACTIVE_STATES, RunStatus, list_runs

#: Upload folders kept per run kept in demo mode (each upload has its own folder).
UPLOADS_PER_RUN = 4
#: Export folders kept (older ones are deleted as new exports are made).
KEEP_EXPORTS = 4


# -- uploads ----------------------------------------------------------------------------------------


def sanitize_filename(name: str) -> str:
    """A safe file name for an upload: no directories, no leading dots, only [A-Za-z0-9._-], at most 120
    characters, and the suffix kept (the profile reads a file by its suffix): a long name is cut before
    its suffix, and a data file with no name before its suffix (`....jsonl`) becomes `upload.jsonl`."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name or "upload").name)
    stem, dot, tail = base.rpartition(".")
    if dot and re.fullmatch(r"[A-Za-z0-9]{1,16}", tail) and (stem.strip(".") or f".{tail.lower()}" in SUFFIX_FORMATS):
        stem, suffix = stem.lstrip(".") or "upload", f".{tail}"
    else:
        stem, suffix = base.lstrip(".") or "upload", ""
    return stem[: 120 - len(suffix)] + suffix


def keep_upload(uploads_dir: Path, temp_path: str, max_bytes: int | None = None) -> Path:
    """Copy an uploaded file (in Gradio's temp folder) into a new folder of `uploads_dir`, with a sanitized
    name; DatasetError when it is larger than `max_bytes` (the public demo's limit)."""
    source = Path(temp_path)
    size = source.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise DatasetError(f"dataset: the upload is {size / 1e6:.1f} MB; the public demo takes files up to "
                           f"{max_bytes / 1e6:.0f} MB. Upload a smaller sample.", field="data.dataset")
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.urandom(3).hex()}"
    target_dir = Path(uploads_dir) / stamp
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / sanitize_filename(source.name)
    shutil.copyfile(source, target)
    return target


def is_upload(path: str | None, uploads_dir: Path) -> bool:
    """Whether `path` names a file inside `uploads_dir` (a kept upload)."""
    if not path:
        return False
    try:
        return Path(path).resolve().is_relative_to(Path(uploads_dir).resolve()) and Path(path).is_file()
    except (OSError, ValueError):
        return False


# -- the history --------------------------------------------------------------------------------------


def history(runs_dir: Path, only: list[str] | None = None) -> list[RunStatus]:
    """Every run's status, newest first; with `only`, just those runs (a demo visitor's own)."""
    runs = list_runs(runs_dir)
    return runs if only is None else [status for status in runs if status.run_id in only]


def active_runs(runs_dir: Path) -> list[RunStatus]:
    """Runs that are queued or running, newest first."""
    return [status for status in list_runs(runs_dir) if status.state in ACTIVE_STATES]


def cleanup_old_runs(runs_dir: Path, uploads_dir: Path, keep: int) -> list[str]:
    """Delete the oldest ended runs beyond the newest `keep`, and upload folders beyond UPLOADS_PER_RUN x
    `keep` (the public demo's disk bound). Returns the run ids removed."""
    ended = sorted((status for status in list_runs(runs_dir) if status.state not in ACTIVE_STATES),
                   key=lambda status: status.created_at or 0)
    removed = []
    for status in ended[: max(0, len(ended) - keep)]:
        shutil.rmtree(status.run_dir, ignore_errors=True)
        removed.append(status.run_id)
    uploads_dir = Path(uploads_dir)
    if uploads_dir.is_dir():
        folders = sorted((p for p in uploads_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for folder in folders[: max(0, len(folders) - UPLOADS_PER_RUN * keep)]:
            shutil.rmtree(folder, ignore_errors=True)
    return removed


# -- export -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def private_exports_dir() -> Path:
    """This process's own folder for export archives (mode 0700, in the temp folder), made on the first
    export, so an app that never exports leaves nothing behind; removed at a clean exit."""
    folder = Path(tempfile.mkdtemp(prefix="tunewise-exports-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def export_folder(parent: Path | None) -> Path:
    """A new folder for one export archive in `parent` (default `private_exports_dir()`), where only the
    newest KEEP_EXPORTS are kept."""
    parent = Path(parent) if parent else private_exports_dir()
    parent.mkdir(parents=True, exist_ok=True)
    old = sorted((p for p in parent.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for folder in old[: max(0, len(old) - (KEEP_EXPORTS - 1))]:
        shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="export-", dir=parent))


def export(run_dir: Path, into: Path | None, reload_16bit: bool, timeout_s: float,
           step: str | None = None) -> tuple[str, str]:
    """(zip archive, one-line note) of a run's tuned model (trainer.rundir.final_output: its output, a
    pipeline's final policy or `step`, or the newest complete checkpoint while there is no output): an
    adapter is merged into its 16-bit base and checked against base + adapter (`python -m trainer.merge`),
    a whole model is zipped as it is. The archive goes to a folder of its own in `into` (see export_folder),
    never into the run."""
    run_dir = Path(run_dir)
    trained = final_output(run_dir, step, policy=False)
    # A single run's output needs no name; a pipeline step, or a checkpoint standing in for an output, does.
    what = "" if trained.label == "output" else f"{trained.label}: "
    what += f"from its newest checkpoint ({trained.path.name}; the run saved no output): " if trained.checkpoint else ""
    stem = run_dir.name if trained.label == "output" else f"{run_dir.name}-{trained.label}"
    if not (trained.path / "adapter_config.json").is_file():
        archive = shutil.make_archive(str(export_folder(into) / f"{stem}-full"), "zip", root_dir=trained.path)
        return archive, _capital(f"{what}the model is already whole (all weights trained); zipped "
                                 f"`{trained.path.name}/` for download.")
    command = [sys.executable, "-m", "trainer.merge", str(run_dir), "--step", trained.label]
    command += ["--reload-16bit"] if reload_16bit else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO_ROOT),
                              env=child_env())
    except subprocess.TimeoutExpired:
        raise TunewiseError(f"export: merging took longer than {timeout_s:.0f} s", field="export") from None
    if done.returncode != 0:
        message = next((line[len("error: "):] for line in reversed(done.stderr.splitlines()) if line.startswith("error: ")),
                       (done.stderr.strip().splitlines() or ["no output"])[-1])
        raise TunewiseError(f"export: {message}", field="export")
    report = json.loads(done.stdout)
    merged = Path(report["out_dir"])
    archive = shutil.make_archive(str(export_folder(into) / f"{stem}-merged"), "zip", root_dir=merged)
    note = _capital(f"{what}merged into `{merged}` ({report['dtype']}). Largest logit difference, merged vs base + adapter, "
            f"on {len(report['prompts'])} prompts: {report['max_abs_logit_diff']:.3g} (tolerance "
            f"{report['tolerance']:.3g}; the adapter itself moves logits by up to {report['adapter_effect']:.3g}).")
    return archive, note


def _capital(text: str) -> str:
    """`text` with its first letter capitalised (a note may begin with its own words or with a step's name)."""
    return text[:1].upper() + text[1:] if text and not text[0].isdigit() else text
