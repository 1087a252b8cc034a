"""Security checks (SECURITY.md): no shell, remote code only on request, uploads kept
under the run directory with safe names, localhost by default, --auth, demo limits
enforced by the server.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".venv-ci", ".git", "runs", "build", "dist", "node_modules", "__pycache__", ".team"}


def _repo_python_files() -> list[Path]:
    files = []
    for path in REPO.rglob("*.py"):
        if SKIP_DIRS & set(path.relative_to(REPO).parts):
            continue
        files.append(path)
    return files


def test_the_scan_sees_the_project():
    names = {p.relative_to(REPO).as_posix() for p in _repo_python_files()}
    # If the walk found nothing, the scans below would pass vacuously.
    assert {"cli.py", "advisor/plan.py", "trainer/events.py", "tests/test_security.py"} <= names


def test_no_shell_true_anywhere():
    # Built from pieces so this file's own source does not match.
    pattern = re.compile(r"""shell['"]?\s*[=:]\s*""" + "True")
    offenders = []
    for path in _repo_python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "a shell is requested here:\n" + "\n".join(offenders)


def test_trust_remote_code_is_never_hard_wired_on():
    # Every place that passes trust_remote_code to a library must pass the plan's value,
    # not a literal True; tests may use literals to build plans.
    pattern = re.compile(r"trust_remote_code\s*=\s*" + "True")
    offenders = []
    for path in _repo_python_files():
        if path.relative_to(REPO).parts[0] == "tests":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "trust_remote_code hard-wired on:\n" + "\n".join(offenders)


def test_plan_keeps_remote_code_off_by_default():
    from advisor.plan import Plan

    assert Plan().model.trust_remote_code is False
    assert Plan.from_yaml("model:\n  name: demo\n").model.trust_remote_code is False
    assert Plan.from_yaml("model:\n  trust_remote_code: true\n").model.trust_remote_code is True


def test_trust_remote_code_reaches_from_pretrained_only_when_the_plan_asks(make_plan, monkeypatch):
    import transformers

    from trainer import models

    seen: dict[str, list] = {"model": [], "tokenizer": []}
    real_model = transformers.AutoModelForCausalLM.from_pretrained.__func__
    real_tokenizer = transformers.AutoTokenizer.from_pretrained.__func__

    def spy_model(cls, *args, **kwargs):
        seen["model"].append(kwargs.get("trust_remote_code", "absent"))
        return real_model(cls, *args, **kwargs)

    def spy_tokenizer(cls, *args, **kwargs):
        seen["tokenizer"].append(kwargs.get("trust_remote_code", "absent"))
        return real_tokenizer(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(spy_tokenizer))

    plan = make_plan()
    assert plan.model.trust_remote_code is False
    models.load_tokenizer(plan)
    models.load_model(plan)
    assert seen == {"model": [False], "tokenizer": [False]}

    asked = make_plan(model__trust_remote_code=True)
    models.load_tokenizer(asked)
    models.load_model(asked)
    assert seen == {"model": [False, True], "tokenizer": [False, True]}


def test_the_trainer_warns_when_remote_code_is_on(make_plan, tmp_path):
    from trainer.context import RunContext
    from trainer.events import EventWriter, read_all_events
    from trainer.runner import preflight

    def notices(plan, name):
        run_dir = tmp_path / name
        ctx = RunContext(plan=plan, run_dir=run_dir, events=EventWriter(run_dir / "events.jsonl"))
        preflight(ctx)
        return [e["message"] for e in read_all_events(run_dir / "events.jsonl") if e["event"] == "notice"]

    assert not [m for m in notices(make_plan(), "off") if "trust_remote_code" in m]
    (warning,) = [m for m in notices(make_plan(model__trust_remote_code=True), "on") if "trust_remote_code" in m]
    assert warning.startswith("warning:") and "own Python code" in warning
