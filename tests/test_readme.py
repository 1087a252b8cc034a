"""The README's promises: exactly two quick-start commands, CI runs the test command
it gives, and its file tree names files that exist (and every module that does)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _quick_start_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", _section("Quick start"), re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_exactly_two_commands_one_app_one_tests():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("python app.py")
    assert commands[1].endswith("python -m pytest")
    assert all(c.startswith("pip install torch==2.13.0 ") for c in commands), "the CPU torch must come first"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _quick_start_commands()[1] in ci


def _tree_paths() -> list[str]:
    block = re.search(r"```text\n(.*?)```", _section("Files"), re.S).group(1)
    paths, stack = [], []
    for line in block.splitlines():
        body = line.lstrip(" ")
        if not body.strip():
            continue
        indent = len(line) - len(body)
        assert indent % 2 == 0, f"README tree: odd indentation in {line!r}"
        depth = indent // 2
        name = body.split("  ")[0].strip()  # the annotation follows two spaces
        stack = stack[:depth]
        path = "/".join(stack + [name.rstrip("/")])
        paths.append(path)
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return paths


def test_file_tree_names_only_files_that_exist():
    missing = [p for p in _tree_paths() if not (ROOT / p).exists()]
    assert not missing, f"README's file tree names files that do not exist: {missing}"


def test_file_tree_lists_every_tracked_module():
    listed = set(_tree_paths())
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    modules = [p for p in tracked if p.count("/") <= 2 and not p.endswith("__init__.py")]
    unlisted = [p for p in modules if p not in listed]
    assert not unlisted, f"README's file tree misses: {unlisted}"
