"""bench/RESULTS.md: each benchmark owns one section, replaced whenever it runs again.

A section starts with `## <bench name>` and runs to the next `## ` heading.
`write_section(name, body)` replaces that section (or appends it), with a
one-line description of the machine and the date under the heading, so a
figure is never read without knowing where it was measured.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nWritten by the scripts in bench/; each section is replaced when its script runs again.\n"


def machine_line() -> str:
    """CPU model, cores, memory, accelerator and library versions, on one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    accelerator = "no GPU"
    versions = ""
    try:
        import torch
        import transformers

        if torch.cuda.is_available():
            accelerator = torch.cuda.get_device_name(0)
        versions = f"; torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:
        pass
    try:
        # Shared machines: the load when the bench started says how much the figures can be trusted.
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return f"{cpu}, {os.cpu_count()} cores{memory}{load}, {accelerator}{versions}"


def write_section(name: str, body: str, path: Path = RESULTS_FILE) -> Path:
    """Replace (or add) the `## name` section of RESULTS.md with `body`."""
    text = path.read_text(encoding="utf-8") if path.is_file() else HEADER
    section = f"## {name}\n\n_{machine_line()}; {time.strftime('%Y-%m-%d')}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
