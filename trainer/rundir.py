"""The run directory: the contract between the UI, the supervisor and the training process.

Everything that names a file in a run directory, or answers "where is this run's X", lives here, so
the layout is written down once:

    <runs>/<run id>/
        plan.yaml        the plan, enough to reproduce the run
        run.json         supervisor bookkeeping: attempts with pid, command, exit code / signal
        meta.json        what the user calls the run: a display name and tags (`tunewise runs --rename/--tag`)
        events.jsonl     append-only events (trainer/events.py)
        stdout.log       everything the training process printed
        watcher.log      what the watcher process printed (trainer/watcher.py)
        STOP             present when a stop was requested (cooperative stop); holds the reason
        .lock            flock'd while a launch, resume or stop checks and changes the run
        procs/           rank<N>.pid: each training process of the current attempt
        data/            a copy of an uploaded dataset (the plan points at it)
        checkpoints/     checkpoint-<step>/ directories (HF Trainer layout)
        output/          the final adapter or model, with its tokenizer (or the plan's `output`)
        tensorboard/     TensorBoard event files, when the plan's training.report_to is tensorboard
        steps/           pipelines only: <n>-<stage>/, one run directory per step, each with its
                         own plan.yaml, events.jsonl, checkpoints/, output/ and result.json
        comparison.json  the compare pipeline's side-by-side report
        pilot.json       learning-rate pilots only: the design (advisor.pilot); the runner then runs the pilot
        pilot_result.json  the pilot's candidates, their held-out losses and the chosen rate (after each one)
        candidates/      the pilot's candidates: <n>-lr<rate>/ with plan.yaml and events.jsonl (no weights)
        job/             cluster jobs only: the job folder `tunewise job` writes (trainer/jobs.py)
        .run.json.lock   cluster jobs only: flock'd while a machine reads and rewrites run.json (the
                         submitter and the job's first node both write it)

The trainer's exit codes are part of the contract too: 0 finished or stopped, 1 failed (a bug or a
crash), 2 failed on the plan or its inputs, 3 failed because the disk is full (EXIT_DISK_FULL).

Standard library only (plus advisor.errors): the app, the CLI, the watcher and the trainer all use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from advisor.errors import TunewiseError
from trainer.events import is_disk_full, release_reserve

PLAN_FILE = "plan.yaml"
RUN_FILE = "run.json"
STDOUT_FILE = "stdout.log"
WATCHER_LOG = "watcher.log"
STOP_FILE = "STOP"
LOCK_FILE = ".lock"
PROCS_DIR = "procs"
DATA_DIR = "data"
CHECKPOINTS_DIR = "checkpoints"
OUTPUT_DIR = "output"
STEPS_DIR = "steps"
RESULT_FILE = "result.json"
COMPARISON_FILE = "comparison.json"
PILOT_FILE = "pilot.json"
PILOT_RESULT_FILE = "pilot_result.json"
CANDIDATES_DIR = "candidates"
ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"
RUNS_DIR_ENV = "TUNEWISE_RUNS_DIR"
JOB_DIR = "job"
TENSORBOARD_DIR = "tensorboard"
META_FILE = "meta.json"
RUN_FILE_LOCK = ".run.json.lock"

#: The trainer's exit code when the disk filled up (said on stderr too, in case no event fitted).
EXIT_DISK_FULL = 3
#: Below this many free bytes on the run's disk, a crash while writing is blamed on a full disk.
DISK_FULL_BYTES = 1_000_000

_RUN_ID = re.compile(r"[\w.-]+")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def is_int(value) -> bool:
    """A whole number that is not a bool (JSON read back from a file may hold anything)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- where runs are ---------------------------------------------------------------------------------


def default_runs_dir() -> Path:
    """$TUNEWISE_RUNS_DIR, else ./runs (relative to the current directory)."""
    configured = os.environ.get(RUNS_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.cwd() / "runs"


def find_run_dir(run: str | Path, runs_dir: str | Path | None = None) -> Path:
    """The directory of a run given its id (in `runs_dir`) or its path; TunewiseError when there is none."""
    text = str(run).strip()
    if not text:
        raise TunewiseError("no run given: pass a run id (see `tunewise runs`) or a run directory")
    candidate = Path(text).expanduser()
    if (candidate / PLAN_FILE).is_file() or (candidate / RUN_FILE).is_file():
        return candidate.resolve()
    base = Path(runs_dir).expanduser() if runs_dir else default_runs_dir()
    if "/" not in text and text not in (".", ".."):
        direct = base / text
        if (direct / PLAN_FILE).is_file() or (direct / RUN_FILE).is_file():
            return direct.resolve()
        if base.is_dir():
            matches = sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith(text) and is_run_dir(p))
            if len(matches) == 1:
                return matches[0].resolve()
            if len(matches) > 1:
                raise TunewiseError(f"run {text!r} is ambiguous: {', '.join(m.name for m in matches[:5])}")
    raise TunewiseError(f"no run {text!r} in {base} (see `tunewise runs --runs-dir DIR`)")


def is_run_dir(path: Path) -> bool:
    """A run directory has plan.yaml or run.json (one of them may be lost; the run is still listed)."""
    return (path / RUN_FILE).is_file() or (path / PLAN_FILE).is_file()


def run_path(runs_dir: str | Path, run_id: str) -> Path:
    """`runs_dir / run_id` for a run id a user (or a browser) handed in; TunewiseError when it is not a
    plain directory name (no separators, no leading dot), so it can never name a path outside `runs_dir`."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or run_id.startswith("."):
        raise TunewiseError(f"run: {run_id!r} is not a run id; pick a run from the history table", field="run")
    return Path(runs_dir) / run_id


def new_run_id(plan, name: str | None = None) -> str:
    """A new run's id for `plan` (an advisor.plan.Plan): <YYYYmmdd-HHMMSS>-<label>-<4 hex>: sortable by
    time, readable, unique."""
    import secrets

    label = name or plan.name or (plan.stage if plan.pipeline == "none" else plan.pipeline) + "-" + plan.method.method
    label = _NAME_CHARS.sub("-", label).strip("-.")[:40] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{label}-{secrets.token_hex(2)}"


def absolute_paths(plan):
    """`plan` (an advisor.plan.Plan) with its local paths made absolute, so the run reproduces from any
    directory (and on any machine that mounts them at the same place)."""
    from advisor.plan import DEMO_DATASETS

    overrides = {}
    for dotted, value in (
        ("model.name", plan.model.name),
        ("data.dataset", plan.data.dataset),
        ("forgetting.original_data", plan.forgetting.original_data),
        ("preference.sft_model", plan.preference.sft_model),
        ("preference.reward_model", plan.preference.reward_model),
    ):
        if not value or value in DEMO_DATASETS or value == "demo":
            continue
        path = Path(value).expanduser()
        if path.exists() and not path.is_absolute():
            overrides[dotted] = str(path.resolve())
    return plan.with_overrides(overrides) if overrides else plan


def output_dir(run_dir: str | Path, plan_output: str | None = None) -> Path:
    """Where a run saves its final adapter or model: the plan's `output` when set, else `<run>/output`."""
    return Path(plan_output) if plan_output else Path(run_dir) / OUTPUT_DIR


def step_dirs(run_dir: str | Path, pipeline: str) -> list[tuple[str, Path]]:
    """(stage, directory) of every step of `pipeline` under `run_dir`, in order (`steps/<n>-<stage>`)."""
    from advisor.plan import PIPELINE_STAGES

    return [(stage, Path(run_dir) / STEPS_DIR / f"{index}-{stage}")
            for index, stage in enumerate(PIPELINE_STAGES[pipeline], 1)]


@dataclass(frozen=True)
class ModelOutput:
    """Something a run trained that can be sampled from, merged and exported."""

    label: str
    """"output" for a single run; a pipeline step's folder name ("1-sft", "3-ppo") for a pipeline."""
    stage: str
    """The stage that trained it: sft, rm, dpo or ppo."""
    path: Path
    """The adapter or model folder (the output, or the newest complete checkpoint while there is none)."""
    run_dir: Path
    """The run directory whose plan trained it: the run itself, or the pipeline step's directory."""
    checkpoint: bool = False
    """True when `path` is a checkpoint: the run (or step) has saved no output yet."""

    @property
    def policy(self) -> bool:
        """Whether it generates text (a reward model scores it instead)."""
        return self.stage != "rm"


def _trained(run_dir: Path, plan, label: str, stage: str) -> ModelOutput | None:
    output = output_dir(run_dir, plan.output)
    if (output / "config.json").is_file() or (output / "adapter_config.json").is_file():
        return ModelOutput(label, stage, output, run_dir)
    checkpoint = last_checkpoint(run_dir)
    return ModelOutput(label, stage, checkpoint, run_dir, checkpoint=True) if checkpoint is not None else None


def model_outputs(run_dir: str | Path) -> list[ModelOutput]:
    """What a run trained, in training order: a single run's output (or newest complete checkpoint), or each
    pipeline step's. The last one that generates (`final_output`) is the run's result by default."""
    from advisor.plan import Plan

    run_dir = Path(run_dir)
    try:
        plan = Plan.load(run_dir / PLAN_FILE)
    except (OSError, TunewiseError):
        return []
    if plan.pipeline == "none":
        found = _trained(run_dir, plan, OUTPUT_DIR, plan.stage)
        return [found] if found else []
    outputs = []
    for stage, step_dir in step_dirs(run_dir, plan.pipeline):
        try:
            step_plan = Plan.load(step_dir / PLAN_FILE)
        except (OSError, TunewiseError):
            continue  # not reached yet
        found = _trained(step_dir, step_plan, step_dir.name, stage)
        if found:
            outputs.append(found)
    return outputs


def final_output(run_dir: str | Path, step: str | None = None, policy: bool = True) -> ModelOutput:
    """The model a run produced: `step` when given (a pipeline step's folder name, its number or its stage,
    e.g. "3-ppo", "3" or "ppo"), else the last one trained (a policy, when `policy`: a pipeline's final
    policy). TunewiseError saying what there is when nothing matches."""
    outputs = model_outputs(run_dir)
    name = Path(run_dir).name
    if not outputs:
        raise TunewiseError(f"run: {name} has no saved adapter or model yet (no output, no complete checkpoint): it "
                            "saves one when it finishes, when a stop ends in time, and every training.save_steps",
                            field="run")
    if step:
        wanted = str(step).strip()
        matches = [o for o in outputs if wanted in (o.label, o.stage, o.label.split("-", 1)[0])]
        if not matches:
            raise TunewiseError(f"step: {name} has no step {wanted!r} with a model; it has "
                                f"{', '.join(o.label for o in outputs)}", field="step")
        return matches[-1]
    candidates = [o for o in outputs if o.policy] if policy else outputs
    if not candidates:
        raise TunewiseError(f"run: {name} trained only a reward model ({outputs[-1].path}); it scores text rather "
                            "than generating it", field="run")
    return candidates[-1]


# -- small file helpers -----------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A JSON object from `path`; {} when the file is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` through a temporary file and a rename; on a full disk, use the run's reserve."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(data, indent=1)
    for last_try in (False, True):
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
            return
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if last_try or not (is_disk_full(exc) and release_reserve(path.parent)):
                raise


def tail_lines(path: Path, count: int, max_bytes: int = 64_000) -> list[str]:
    """The last `count` non-empty lines of a text file (reading at most its last `max_bytes`)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-count:]


@contextlib.contextmanager
def run_lock(run_dir: Path, doing: str, wait_s: float = 0.0):
    """Hold the run's lock (`flock` on <run>/.lock) while `doing` ("resumed", "stopped", ...) the run.

    The lock is per open file and dies with its process, so a crashed holder never leaves it
    stuck. When another process holds it for longer than `wait_s`, TunewiseError names what it does.
    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TunewiseError(f"run {run_dir.name} is being {_lock_holder(fd)} by another process: wait "
                                        f"for it, then see `tunewise status {run_dir.name}`") from None
                time.sleep(0.05)
        try:
            os.pwrite(fd, f"{doing} (pid {os.getpid()})".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same
            pass
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # still holding it: no later reader sees this holder as current
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """What the holder of a run's lock says it does; it writes that just after taking the lock, so wait a moment."""
    for _ in range(10):
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "started, resumed or stopped"


# -- the user's labels ----------------------------------------------------------------------------------

#: A tag: a short word (letters, digits, _ . - and +), so tags filter and print without quoting.
_TAG = re.compile(r"[A-Za-z0-9_.+-]{1,40}")
#: The longest display name (a name is a label, not a description).
MAX_NAME = 80


def read_meta(run_dir: str | Path) -> dict:
    """A run's labels: {"name": str | None, "tags": [str, ...]} (meta.json; empty when there is none, and what
    is malformed in it is ignored)."""
    data = read_json(Path(run_dir) / META_FILE)
    name = data.get("name") if isinstance(data.get("name"), str) and data["name"].strip() else None
    tags = [t for t in data.get("tags") or [] if isinstance(t, str) and _TAG.fullmatch(t)] if isinstance(
        data.get("tags"), list) else []
    return {"name": name, "tags": list(dict.fromkeys(tags))}


def check_name(name: str) -> str:
    """A display name, stripped; TunewiseError when empty, too long or holding control characters."""
    if not isinstance(name, str) or not name.strip():
        raise TunewiseError("name: is empty: give the run a short name, e.g. \"lora r16 lr2e-4\"", field="name")
    name = name.strip()
    if len(name) > MAX_NAME or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise TunewiseError(f"name: must be one line of at most {MAX_NAME} characters, got {len(name)} characters"
                            + (" with a control character" if any(ord(ch) < 32 or ord(ch) == 127 for ch in name) else ""),
                            field="name")
    return name


def check_tag(tag: str) -> str:
    """A tag, stripped; TunewiseError unless it is one short word."""
    tag = tag.strip() if isinstance(tag, str) else ""
    if not _TAG.fullmatch(tag):
        raise TunewiseError(f"tag: {tag!r:.50} is not a tag: use one word of at most 40 letters, digits, _ . + or - "
                            "(e.g. baseline, lr-sweep)", field="tag")
    return tag


def update_meta(run_dir: str | Path, name: str | None = None, add_tags: tuple[str, ...] = (),
                remove_tags: tuple[str, ...] = ()) -> dict:
    """Rename and tag a run in its meta.json (under the run's lock, written atomically); return the new labels.
    The run id (its folder) never changes: pipelines, resumes and the CLI keep finding the run by it."""
    run_dir = Path(run_dir)
    name = check_name(name) if name is not None else None
    add = [check_tag(t) for t in add_tags]
    remove = {check_tag(t) for t in remove_tags}
    with run_lock(run_dir, "relabelled", wait_s=5.0):
        meta = read_meta(run_dir)
        if name is not None:
            meta["name"] = name
        meta["tags"] = [t for t in dict.fromkeys(meta["tags"] + add) if t not in remove]
        write_json_atomic(run_dir / META_FILE, meta)
    return meta


# -- checkpoints ------------------------------------------------------------------------------------


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (checkpoint-<step>/ that passes `checkpoint_problem`), or None."""
    return resumable_checkpoint(run_dir)[0]


def resumable_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint, and (checkpoint, what is wrong) for each newer one passed over."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _CHECKPOINT.fullmatch(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    skipped = []
    for _, child in sorted(found, reverse=True):
        problem = checkpoint_problem(child)
        if problem is None:
            return child, skipped
        skipped.append((child, problem))
    return None, skipped


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What makes `checkpoint` unusable (a file missing, empty or cut short), or None when it looks complete.

    Cheap, so a resume can check before starting a trainer: it reads trainer_state.json, the header
    of each .safetensors file (8 bytes of header length, then the JSON header, whose tensor offsets
    must fit in the file) and the zip directory at the end of each torch file (.pt / .pth / .bin:
    torch saves a zip archive); no tensor is read.
    """
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "trainer_state.json is missing (the save did not finish)"
    except (OSError, ValueError):
        return "trainer_state.json is unreadable or cut short (the save did not finish)"
    if not isinstance(state, dict) or not is_int(state.get("global_step", 0)):
        return "trainer_state.json has no whole-number global_step"
    for path in sorted(checkpoint.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_problem(path)
        else:
            continue
        if problem:
            return f"{path.name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"is cut short ({size} bytes, less than its 8-byte header length)"
            header_bytes = int.from_bytes(head, "little")
            if 8 + header_bytes > size:
                return f"is cut short: its header alone says {8 + header_bytes} bytes, the file has {size}"
            header = json.loads(handle.read(header_bytes))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return "has a damaged header (not valid JSON)"
    if not isinstance(header, dict):
        return "has a damaged header (not a JSON object)"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
            and is_int(entry["data_offsets"][1])]
    needed = 8 + header_bytes + max(ends, default=0)
    if needed > size:
        return f"is cut short: its tensors need {needed} bytes, the file has {size}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if size == 0:
            return "is empty (0 bytes)"
        if magic != b"PK\x03\x04":
            return None  # not torch's zip format (an older pickle file): nothing cheap to check
        if not zipfile.is_zipfile(path):
            return f"is cut short ({size} bytes; the zip directory torch writes at the end is missing)"
        with zipfile.ZipFile(path) as archive:
            ends = [info.header_offset + info.compress_size for info in archive.infolist()]
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except zipfile.BadZipFile as exc:
        return f"is damaged ({exc})"
    if max(ends, default=0) > size:
        return f"is cut short: its entries need {max(ends)} bytes, the file has {size}"
    return None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json's global_step; 0 when unreadable)."""
    step = read_json(Path(checkpoint) / "trainer_state.json").get("global_step", 0)
    return step if is_int(step) else 0


def drop_partial_checkpoints(run_dir: Path) -> list[str]:
    """Delete checkpoint-*/ directories whose trainer_state.json is missing or unreadable (a save cut
    short): they cannot be resumed from, and removing them frees room for the `failed` event."""
    removed = []
    for child in sorted((Path(run_dir) / CHECKPOINTS_DIR).glob("checkpoint-*")):
        try:
            json.loads((child / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed
