"""`tunewise plan / recommend / profile` as real subprocesses: JSON shape, values, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def tunewise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_plan_json_all_methods():
    from advisor import specs

    result = tunewise("plan", "--model", "llama-2-7b", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["params_total"] == specs.param_counts(specs.resolve_model("meta-llama/Llama-2-7b-hf")).total
    assert report["model"]["id"] == "meta-llama/Llama-2-7b-hf"
    estimates = {entry["method"]: entry for entry in report["estimates"]}
    assert list(estimates) == ["full", "lora", "qlora"]
    for entry in estimates.values():
        assert set(entry) >= {"method", "components", "peak_allocated_bytes", "total_bytes"}
        assert all(isinstance(value, int) and value >= 0 for value in entry["components"].values())
        assert entry["total_bytes"] > entry["peak_allocated_bytes"] > 0
        assert "max_micro_batch" not in entry  # only with --gpu-memory-gb
    assert estimates["qlora"]["total_bytes"] < estimates["lora"]["total_bytes"] < estimates["full"]["total_bytes"]


def test_plan_one_method_with_gpu_memory_gives_the_fit():
    result = tunewise("plan", "--model", "meta-llama/Llama-2-7b-hf", "--method", "qlora", "--micro-batch", "2",
                      "--seq-len", "1024", "--gradient-checkpointing", "--gpu-memory-gb", "24", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [entry["method"] for entry in report["estimates"]] == ["qlora"]
    entry = report["estimates"][0]
    assert entry["fits"] is True and entry["max_micro_batch"] >= 2 and entry["max_seq_len"] >= 1024
    assert report["setup"]["micro_batch"] == 2 and report["setup"]["gradient_checkpointing"] is True

    table = tunewise("plan", "--model", "meta-llama/Llama-2-7b-hf", "--gpu-memory-gb", "24")
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if line.startswith("component"))
    assert header.split() == ["component", "full", "lora", "qlora"]
    assert "fits 24 GB GPU (24.00)" in table.stdout
    total_row = next(line for line in table.stdout.splitlines() if line.startswith("total"))
    assert all("." in cell and len(cell.split(".")[1]) == 2 for cell in total_row.split()[-3:])  # GB, 2 decimals


def test_plan_guide_shows_the_guide_table_beside_ours():
    result = tunewise("plan", "--model", "7B", "--guide", "--json")
    assert result.returncode == 0, result.stderr
    guide = json.loads(result.stdout)["guide_table"]
    cells = {(row["size"], row["method"]): row for row in guide["rows"]}
    assert len(cells) == 9
    # The guide's own figures, as it prints them.
    assert cells[("7B", "full")]["guide_bytes"] == 28e9 and cells[("70B", "qlora")]["guide_bytes"] == 48e9
    # Full fine-tuning with AdamW needs ~16 bytes per parameter: far above the guide's 4.
    assert cells[("7B", "full")]["estimate_bytes"] > 16 * 6.7e9
    assert "16 bytes per parameter" in guide["note"]
    text = tunewise("plan", "--model", "7B", "--guide")
    assert text.returncode == 0, text.stderr
    row_7b = next(line for line in text.stdout.splitlines() if line.startswith("7B "))
    assert row_7b.split()[1] == "28"


def test_plan_errors_exit_2_naming_the_problem():
    unknown = tunewise("plan", "--model", "not-a-real-model-xyz", "--json")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: ") and "not-a-real-model-xyz" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    rank = tunewise("plan", "--model", "gpt2", "--lora-rank", "0")
    assert rank.returncode == 2 and "lora_rank" in rank.stderr and "Traceback" not in rank.stderr


def test_recommend_prints_values_with_reasons():
    result = tunewise("recommend", "--model", "gpt2", "--examples", "5000", "--task", "classification",
                      "--gpu", "T4", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["values"]["lora_rank"]["value"] == 4
    assert out["values"]["lora_rank"]["reason"].startswith("guide: LoRA rank table, simple (classification) -> 4-8")
    # Every linear layer (the evidence), the guide's minimum set shown beside it, in the CLI's JSON too.
    assert out["values"]["lora_targets"]["value"] == ["c_attn", "c_proj", "c_fc"]
    assert "guide: Minimum (query, value projections)" in out["values"]["lora_targets"]["reason"]
    assert "attention-only LoRA underperforms" in out["values"]["lora_targets"]["reason"]
    assert out["memory"]["fits"] is True
    text = tunewise("recommend", "--model", "gpt2", "--examples", "5000", "--task", "classification",
                    "--set", "lora_rank=8")
    assert text.returncode == 0, text.stderr
    assert "lora_rank" in text.stdout and "8 (set by you)" in text.stdout


def test_profile_json_and_bad_row(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e"\n')
    bad = tunewise("profile", str(data))
    assert bad.returncode == 2 and "line 3 of chat.jsonl is not valid JSON" in bad.stderr
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "dd"}\n')
    good = tunewise("profile", str(data), "--json")
    assert good.returncode == 0, good.stderr
    profile = json.loads(good.stdout)
    assert profile["format"] == "prompt_completion" and profile["examples"] == 2
    assert profile["tokens_exact"] is False and profile["recommended_seq_len"] == 64
    # ~4 characters per token: "b" and "dd" are one token each, the loss-carrying tokens of the two rows.
    assert profile["tokens"]["completion_total"] == 2 and profile["tokens"]["estimated_completion"] == 2
