"""The planning subcommands of `tunewise`: plan (memory), recommend (advice), profile (data).

`register(subparsers)` adds them to the top-level parser in `cli.py`; each sets
`func`, which prints a readable report (or JSON with `--json`) and returns the
exit code. Bad input raises `TunewiseError`, which `cli.py` prints as
`error: ...` with exit code 2. No torch import anywhere on this path.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Iterable, Mapping

from advisor.errors import TunewiseError
from advisor.plan import METHODS, STAGES, Plan, PlanError, Setting, settings

GB = 1e9


def _gb(num_bytes: int | float | None) -> str:
    """Bytes as GB (1e9) with 2 decimals, the unit of every table here."""
    return "-" if num_bytes is None else f"{num_bytes / GB:.2f}"


# -- plan settings as flags (both CLIs build theirs here, from advisor.plan.settings()) ------------------


def _shown_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return _number_text(value) if isinstance(value, float) else str(value)


def _number_text(value: float) -> str:
    """A float as short as it reads back exactly: 0.0002, 1e-05, 3 (not 3.0)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def add_plan_flags(parser, chosen: Iterable[Setting], defaults: Mapping[str, str] | None = None) -> None:
    """Add a flag for each of the `chosen` settings (its help is the setting's docstring, and its default
    the plan's, unless `defaults` says otherwise by dotted name). Unset flags read None, so they change
    nothing (`plan_overrides`); a yes/no setting takes --flag / --no-flag."""
    for setting in chosen:
        default = (defaults or {}).get(setting.dotted)
        if default is None and setting.default is not None:
            default = _shown_default(setting.default)
        text = setting.help + (f" Default: {default}." if default else "")
        names = [setting.flag, *setting.aliases]
        common = {"dest": setting.dotted, "default": None, "help": text.replace("%", "%%")}
        if setting.type is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        else:
            kind = setting.type if setting.type in (int, float) else str
            parser.add_argument(*names, type=kind, metavar={int: "N", float: "X"}.get(kind, "NAME"), **common)


def plan_overrides(args: argparse.Namespace, chosen: Iterable[Setting]) -> dict[str, Any]:
    """The flags of `add_plan_flags` as dotted plan settings (None where a flag was not given)."""
    return {setting.dotted: getattr(args, setting.dotted) for setting in chosen}


def flag_argv(setting: Setting, value: Any) -> list[str]:
    """What to type for `setting` to take `value` (the inverse of `add_plan_flags`); [] for None, which no
    flag can say (an unset flag keeps the plan's value)."""
    if value is None:
        return []
    if setting.type is bool:
        return [setting.flag if value else "--no-" + setting.flag[2:]]
    if isinstance(value, (list, tuple)):
        return [setting.flag, ",".join(map(str, value))]
    return [setting.flag, _number_text(value) if isinstance(value, float) else str(value)]


def register(subparsers) -> None:
    """Add `plan`, `recommend` and `profile` to the `tunewise` parser."""
    plan = subparsers.add_parser(
        "plan",
        help="estimate GPU memory for full / LoRA / QLoRA fine-tuning",
        description="Estimate training memory per GPU, component by component, for one method or all three.",
    )
    plan.add_argument("--model", required=True, help="catalogue id or alias, local directory with config.json, or a size like 7B")
    plan.add_argument("--method", choices=METHODS, help="estimate one method (default: all three)")
    add_plan_flags(plan.add_argument_group("memory settings (the plan's defaults unless given)"), _memory_settings(),
                   defaults={"method.lora_targets": "the guide's recommended set for the model, all attention"})
    plan.add_argument("--gpus-per-node", type=int, help="GPUs in each node (with --nodes; instead of --gpus)")
    plan.add_argument("--interconnect-gbps", type=float,
                      help="network speed between nodes in Gbit/s per node, for the traffic estimate "
                           "(default 100: cloud Ethernet; an InfiniBand node with 8 x 400 Gb NICs: 3200)")
    plan.add_argument("--gpu", help="GPU name (e.g. A100-80GB, T4) to check the fit on")
    plan.add_argument("--gpu-memory-gb", type=float, help="memory per GPU in GB to check the fit on (overrides --gpu's)")
    plan.add_argument("--host-ram-gb", type=float,
                      help="RAM of the machine that trains, in GB, to check the host RAM estimate on (default: this "
                           "machine's RAM when it is the one that trains: no GPU named, or this machine has an NVIDIA GPU)")
    plan.add_argument("--explain", action="store_true", help="show how each component was computed")
    plan.add_argument("--guide", action="store_true",
                      help="also show the guide's quick-reference table (7B/13B/70B) beside our estimate, and why they differ")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(func=cmd_plan)

    rec = subparsers.add_parser(
        "recommend",
        help="recommend a method and hyperparameters, each with the guide rule behind it",
        description="Apply the fine-tuning guide's rules to your model, data, goal and GPU.",
    )
    rec.add_argument("--model", required=True, help="catalogue id or alias, local directory, or a size like 7B")
    rec.add_argument("--examples", type=int, required=True, help="training examples (pairs for preference stages)")
    rec.add_argument("--task", required=True, choices=("classification", "qa", "summarization", "instruction", "max"),
                     help="task complexity (the guide's rank table)")
    rec.add_argument("--tokens", type=int, help="total training tokens, when known")
    rec.add_argument("--completion-tokens", type=int,
                     help="training tokens that carry the loss (`tunewise profile` prints them): checks the LoRA rank's capacity")
    rec.add_argument("--dataset", help="the dataset's name or path, for advice measured on it (the demo model's)")
    rec.add_argument("--domain-shift", choices=("low", "medium", "high"), default="medium", help="how different the task is from pretraining")
    rec.add_argument("--priority", choices=("quality", "balanced", "memory"), default="balanced")
    rec.add_argument("--gpu", help="GPU name (e.g. A100-80GB, T4)")
    rec.add_argument("--gpu-memory-gb", type=float, help="memory per GPU in GB (for a GPU not in the list)")
    rec.add_argument("--gpus", type=int, default=1, help="number of GPUs (per node with --nodes)")
    rec.add_argument("--nodes", type=int, default=1, help="machines training together (default 1)")
    rec.add_argument("--stage", choices=STAGES, default="sft")
    rec.add_argument("--pipeline", choices=("none", "rlhf", "dpo", "compare"), default="none")
    rec.add_argument("--quantized-inference", action="store_true", help="the model will be served quantized")
    rec.add_argument("--will-merge", action="store_true", help="the adapter will be merged back into a 16-bit model")
    rec.add_argument("--preserve-original", action="store_true", help="forgetting original abilities is a concern")
    rec.add_argument("--seq-len", type=int, help="training sequence length (e.g. from `tunewise profile`)")
    rec.add_argument("--sft-model", help="for dpo / ppo: the SFT model to start from")
    rec.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="fix one value yourself (e.g. --set lora_rank=32); repeatable")
    rec.add_argument("--save", metavar="PLAN.yaml", help="write the recommended plan to this file")
    rec.add_argument("--json", action="store_true", help="print JSON")
    rec.set_defaults(func=cmd_recommend)

    prof = subparsers.add_parser(
        "profile",
        help="profile a dataset: format, examples, token lengths, sequence length and packing",
        description="Read a local JSONL / JSON / CSV / Parquet / text file (or a bundled demo name) and profile it.",
    )
    prof.add_argument("dataset", help="a file, or a bundled name (demo-sft, demo-preference, demo-original, demo-pretrain)")
    prof.add_argument("--model", help="count tokens with this model's tokenizer.json when it is on this machine")
    prof.add_argument("--format", default="auto", choices=("auto", "text", "prompt_completion", "messages", "preference"))
    prof.add_argument("--max-rows", type=int, default=100_000, help="profile at most this many rows")
    prof.add_argument("--json", action="store_true", help="print JSON")
    prof.set_defaults(func=cmd_profile)


# -- plan -----------------------------------------------------------------------------------------------


def _memory_settings() -> list[Setting]:
    """The settings `tunewise plan` takes as flags: those the memory estimate reads (--method is its own)."""
    return [setting for setting in settings() if setting.memory and setting.dotted != "method.method"]


def _plan_overrides(args, spec) -> dict[str, Any]:
    """CLI flags as dotted plan settings (unset flags are None and skipped by with_overrides)."""
    from advisor import specs

    overrides = {"model.name": args.model, **plan_overrides(args, _memory_settings())}
    if args.gpus_per_node is not None:
        overrides["hardware.num_gpus"] = args.gpus_per_node
    if overrides["method.lora_targets"] is None:
        overrides["method.lora_targets"] = specs.target_module_sets(spec)["recommended"]
    return overrides


def _gpu_bytes(gpu_name: str | None, gpu_memory_gb: float | None) -> tuple[str | None, int | None]:
    """(label, bytes per GPU) from --gpu / --gpu-memory-gb, or (None, None)."""
    label, num_bytes = None, None
    if gpu_name:
        from advisor import gpus

        gpu = gpus.find_gpu(gpu_name)
        label, num_bytes = gpu.name, int(gpu.memory_bytes)
    if gpu_memory_gb is not None:
        from advisor.plan import check_number

        check_number("hardware.gpu_memory_gb", gpu_memory_gb, name="--gpu-memory-gb")  # refuses nan, inf, 1e308
        num_bytes = int(gpu_memory_gb * GB)
        label = label or f"{gpu_memory_gb:g} GB GPU"
    return label, num_bytes


def _host_bytes(host_ram_gb: float | None, gpu_named: bool) -> tuple[str | None, int | None]:
    """(label, bytes) of the host RAM to check against: --host-ram-gb, else this machine's RAM when this
    machine is the one that trains (no GPU named, so it trains here; or it has an NVIDIA GPU), else none."""
    from advisor.gpus import this_machine

    if host_ram_gb is not None:
        from advisor.plan import check_number

        check_number("hardware.gpu_memory_gb", host_ram_gb, name="--host-ram-gb")  # same range as a GPU's memory
        return f"{host_ram_gb:g} GB of RAM", int(host_ram_gb * GB)
    machine = this_machine()
    if machine.ram_bytes and (not gpu_named or machine.has_nvidia_gpu):
        return f"this machine ({machine.ram_bytes / GB:.1f} GB of RAM)", machine.ram_bytes
    return None, None


def memory_entry(spec, setup, gpu_bytes: int | None, host_bytes: int | None, on_gpu: bool,
                 checkpoint: tuple[int, bool] | None) -> dict[str, Any]:
    """One method's estimate as `tunewise plan --json` gives it (the wizard reads the same): components,
    phases and the phase that sets the peak, warnings, QLoRA's quantized set, host RAM, and the fits."""
    from advisor import memory

    result = memory.estimate(spec, setup)
    entry: dict[str, Any] = {
        "method": setup.method,
        "components": {name: int(value) for name, value in result.components.items()},
        "peak_allocated_bytes": int(result.peak_allocated_bytes),
        "total_bytes": int(result.total_bytes),
        "peak_phase": result.peak_phase,
        "phases": {name: int(value) for name, value in result.phases.items()},
        "explanations": dict(result.explanations),
        "phase_explanations": dict(result.phase_explanations),
        "warnings": list(result.warnings),
    }
    if setup.method == "qlora":
        report = memory.quantization_report(spec, setup)
        entry["quantization"] = {
            "quantized_params": int(report.quantized_params),
            "kept_params": {kind: int(n) for kind, n in report.kept_params.items()},
            "kept_dtype": report.kept_dtype,
            "kept_bytes": int(report.kept_bytes),
            "saved_vs_lora_bytes": int(report.saved_bytes),
        }
    mmap = checkpoint[1] if checkpoint else True
    checkpoint_bytes = checkpoint[0] if checkpoint else None
    host = memory.host_estimate(spec, setup, on_gpu=on_gpu, mmap=mmap, checkpoint_bytes=checkpoint_bytes)
    entry["host_ram_bytes"] = int(host.host_ram_bytes)
    entry["host_components"] = {name: int(value) for name, value in host.components.items()}
    entry["host_explanations"] = dict(host.explanations)
    if host_bytes is not None:
        fit = memory.host_fit(spec, setup, host_bytes, on_gpu=on_gpu, mmap=mmap, checkpoint_bytes=checkpoint_bytes)
        entry["host_fits"] = bool(fit.fits)
        entry["host_cheapest_fix"] = fit.cheapest_fix
    if gpu_bytes is not None:
        fit = memory.gpu_fit(spec, setup, gpu_bytes)
        entry.update({
            "fits": bool(fit.fits),
            "max_micro_batch": int(fit.max_micro_batch or 0),
            "max_seq_len": int(fit.max_seq_len or 0),
            "cheapest_fix": fit.cheapest_fix,
        })
    return entry


def _check_layout(args) -> None:
    """--nodes / --gpus-per-node: nodes >= 1, and no more GPUs per node than a node holds."""
    from advisor.plan import check_gpus_per_node

    nodes = getattr(args, "hardware.num_nodes")
    if nodes is not None and nodes < 1:
        raise TunewiseError(f"--nodes must be at least 1 (a machine), got {nodes}", field="hardware.num_nodes")
    per_node = args.gpus_per_node if args.gpus_per_node is not None else (getattr(args, "hardware.num_gpus") or 1)
    if per_node < 1:
        raise TunewiseError(f"--gpus-per-node must be at least 1, got {per_node}", field="hardware.num_gpus")
    check_gpus_per_node(args.gpu, per_node, nodes or 1)


def _cluster_entry(spec, setup, args) -> dict[str, Any]:
    """The multi-node figures of one method: memory per GPU by strategy, host RAM, traffic, warnings."""
    from advisor import cluster, gpus

    tflops = gpus.find_gpu(args.gpu).dense_tflops if args.gpu else None
    found = cluster.cluster_estimate(spec, setup, args.interconnect_gbps, tflops)
    return {
        "nodes": found.nodes,
        "gpus_per_node": found.gpus_per_node,
        "world_size": found.world_size,
        "per_gpu_bytes": {shard: int(value) for shard, value in found.per_gpu_bytes.items()},
        "host_bytes_per_node": int(found.host_bytes_per_node),
        "host_explanation": found.host_explanation,
        "interconnect_gbps": found.interconnect_gbps,
        "traffic": {
            shard: {
                "bytes_per_step": int(t.bytes_per_step),
                "seconds_per_step": t.seconds_per_step,
                "compute_seconds_per_step": t.compute_seconds_per_step,
                "needed_gbps": t.needed_gbps,
                "explanation": t.explanation,
            }
            for shard, t in found.traffic.items()
        },
        "warnings": list(found.warnings),
    }


def format_cluster_report(report: dict) -> list[str]:
    """The multi-node section: memory per GPU by strategy, host RAM per node, traffic between nodes."""
    from advisor.cluster import STRATEGIES

    estimates = [e for e in report["estimates"] if "cluster" in e]
    if not estimates:
        return []
    first = estimates[0]["cluster"]
    shard = report["setup"]["shard"]
    lines = ["", f"over {first['nodes']} node{'s' if first['nodes'] > 1 else ''} x {first['gpus_per_node']} GPUs = "
             f"{first['world_size']} GPUs (network between nodes: {first['interconnect_gbps']:g} Gb/s per node)"]
    header = ["per GPU (GB)"] + [e["method"] for e in estimates]
    rows = [[name] + [_gb(e["cluster"]["per_gpu_bytes"][key]) for e in estimates] for key, name in STRATEGIES.items()]
    rows.append(["host RAM per node"] + [_gb(e["cluster"]["host_bytes_per_node"]) for e in estimates])
    if first["nodes"] > 1:
        rows.append([f"between nodes per step ({shard})"] + [_gb(e["cluster"]["traffic"][shard]["bytes_per_step"])
                                                             for e in estimates])
        rows.append([f"  seconds at {first['interconnect_gbps']:g} Gb/s"]
                    + [f"{e['cluster']['traffic'][shard]['seconds_per_step']:.2f}" for e in estimates])
        rows.append(["  seconds of compute"] + [
            "-" if e["cluster"]["traffic"][shard]["compute_seconds_per_step"] is None
            else f"{e['cluster']['traffic'][shard]['compute_seconds_per_step']:.2f}" for e in estimates])
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header)))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(row)))
    lines.append(f"host RAM: {first['host_explanation']}")
    if first["nodes"] > 1:
        lines.append(f"traffic: {first['traffic'][shard]['explanation']}")
    for entry in estimates:
        for warning in entry["cluster"]["warnings"]:
            lines.append(f"warning ({entry['method']}): {warning}")
    return lines


def build_plan_report(args) -> dict:
    """Everything `tunewise plan` prints, as the JSON object (the table is drawn from it)."""
    from advisor import memory, specs

    spec = specs.resolve_model(args.model)
    counts = specs.param_counts(spec)
    if getattr(args, "hardware.num_gpus") is not None and args.gpus_per_node is not None:
        raise TunewiseError("--gpus and --gpus-per-node both given: use --nodes N --gpus-per-node G for several "
                            "machines, or --gpus for one", field="hardware.num_gpus")
    cluster_wanted = getattr(args, "hardware.num_nodes") is not None or args.gpus_per_node is not None
    if cluster_wanted:
        _check_layout(args)
    overrides = _plan_overrides(args, spec)
    base = Plan().with_overrides(overrides)  # PlanError names a bad flag (e.g. method.lora_rank)
    specs.check_seq_len(spec, base.training.seq_len, base.training.rope_scaling, base.training.rope_factor)
    gpu_label, gpu_bytes = _gpu_bytes(args.gpu, args.gpu_memory_gb)
    host_label, host_bytes = _host_bytes(getattr(args, "host_ram_gb", None), gpu_bytes is not None)
    checkpoint = specs.checkpoint_on_disk(args.model)
    methods = [args.method] if args.method else list(METHODS)
    estimates, skipped = [], []
    for method in methods:
        try:
            plan = base.with_overrides({"method.method": method})
        except PlanError as exc:
            if args.method:
                raise
            skipped.append({"method": method, "reason": str(exc)})
            continue
        setup = memory.setup_from_plan(plan)
        # With no GPU named, the run trains on this machine: on its CPU unless it has an NVIDIA GPU.
        on_gpu = gpu_bytes is not None or _has_gpu()
        entry = memory_entry(spec, setup, gpu_bytes, host_bytes, on_gpu, checkpoint)
        if cluster_wanted:
            entry["cluster"] = _cluster_entry(spec, setup, args)
        estimates.append(entry)
    first_plan = base.with_overrides({"method.method": estimates[0]["method"]}) if estimates else base
    report = {
        "model": {
            "name": args.model,
            "id": spec.id,
            "model_type": spec.model_type,
            "rough": bool(getattr(spec, "rough", False)),
            "params_total": int(counts.total),
            "params": {
                "embeddings": int(counts.embeddings),
                "attention": int(counts.attention),
                "mlp": int(counts.mlp),
                "norms": int(counts.norms),
                "lm_head": int(counts.lm_head),
                "quantizable": int(counts.quantizable),
            },
        },
        "setup": {
            "stage": first_plan.stage,
            "micro_batch": first_plan.training.micro_batch,
            "seq_len": first_plan.training.seq_len,
            "precision": first_plan.method.precision,
            "optimizer": first_plan.method.optimizer,
            "gradient_checkpointing": first_plan.method.gradient_checkpointing,
            "attn": first_plan.method.attn,
            "lora_rank": first_plan.method.lora_rank,
            "lora_targets": list(first_plan.method.lora_targets),
            "quant_bits": first_plan.method.quant_bits,
            "double_quant": first_plan.method.double_quant,
            "num_gpus": first_plan.hardware.num_gpus,
            "num_nodes": first_plan.hardware.num_nodes,
            "shard": first_plan.hardware.shard,
            "rope_scaling": first_plan.training.rope_scaling,
            "rope_factor": (specs.rope_factor_for(spec.max_position_embeddings, first_plan.training.seq_len,
                                                  first_plan.training.rope_factor)
                            if first_plan.training.rope_scaling != "none" else None),
            "use_liger_kernel": first_plan.method.use_liger_kernel,
        },
        "estimates": estimates,
    }
    if gpu_bytes is not None:
        report["gpu"] = {"name": gpu_label, "memory_bytes": gpu_bytes}
    if host_bytes is not None:
        report["host"] = {"name": host_label, "ram_bytes": host_bytes}
    if skipped:
        report["skipped"] = skipped
    return report


def _has_gpu() -> bool:
    from advisor.gpus import this_machine

    return this_machine().has_nvidia_gpu


def format_plan_report(report: dict, explain: bool = False) -> str:
    """The plan report as a table: components down, methods across, GB with 2 decimals."""
    model = report["model"]
    setup = report["setup"]
    lines = [
        f"{model['id']} ({model['model_type']}): {model['params_total'] / 1e9:.3f}B parameters"
        + (" (rough: from the size alone)" if model.get("rough") else ""),
        f"stage {setup['stage']}, micro-batch {setup['micro_batch']}, seq {setup['seq_len']}, {setup['precision']}, "
        f"{setup['optimizer']}, gradient checkpointing {'on' if setup['gradient_checkpointing'] else 'off'}, "
        f"attn {setup['attn']}, LoRA r{setup['lora_rank']} on {','.join(setup['lora_targets'])}, "
        + (f"{setup['num_nodes']} nodes x " if setup.get("num_nodes", 1) > 1 else "")
        + f"{setup['num_gpus']} GPU{'s' if setup['num_gpus'] > 1 else ''} ({setup['shard']})",
        "memory per GPU in GB (1e9 bytes)",
        "",
    ]
    estimates = report["estimates"]
    names: list[str] = []
    for entry in sorted(estimates, key=lambda e: -len(e["components"])):
        for name in entry["components"]:
            if name not in names:
                names.append(name)
    rows = [[name] + [_gb(entry["components"].get(name)) for entry in estimates] for name in names]
    rows.append(["peak allocated"] + [_gb(entry["peak_allocated_bytes"]) for entry in estimates])
    rows.append(["  set by phase"] + [entry["peak_phase"].replace("_", " ") for entry in estimates])
    rows.append(["total (GPU must hold)"] + [_gb(entry["total_bytes"]) for entry in estimates])
    rows.append(["host RAM (per node)"] + [_gb(entry["host_ram_bytes"]) for entry in estimates])
    if "host" in report:
        rows.append([f"fits {report['host']['name']}"] + ["yes" if entry["host_fits"] else "NO" for entry in estimates])
    if "gpu" in report:
        rows.append([f"fits {report['gpu']['name']} ({_gb(report['gpu']['memory_bytes'])})"]
                    + ["yes" if entry["fits"] else "NO" for entry in estimates])
        rows.append(["max micro-batch"] + [str(entry["max_micro_batch"]) for entry in estimates])
        rows.append(["max seq len"] + [str(entry["max_seq_len"]) for entry in estimates])
    header = ["component"] + [entry["method"] for entry in estimates]
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header)))
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(row)))
    if "gpu" in report:
        for entry in estimates:
            if not entry["fits"] and entry.get("cheapest_fix"):
                lines.append(f"{entry['method']} does not fit: {entry['cheapest_fix']}")
    if "host" in report:
        for entry in estimates:
            if not entry["host_fits"]:
                lines.append(f"{entry['method']} does not fit {report['host']['name']}: "
                             + (entry.get("host_cheapest_fix") or "no change tried makes it fit"))
    said: list[str] = []
    for entry in estimates:
        for warning in entry["warnings"]:
            if warning not in said:
                said.append(warning)
                lines.append(f"warning ({entry['method']}): {warning}")
    for item in report.get("skipped", []):
        lines.append(f"{item['method']} skipped: {item['reason']}")
    lines += format_cluster_report(report)
    if explain:
        for entry in estimates:
            lines.append("")
            lines.append(f"{entry['method']}:")
            for name, text in entry["explanations"].items():
                lines.append(f"  {name}: {text}")
            for name, text in entry["phase_explanations"].items():
                lines.append(f"  phase {name}: {text}")
            for name, text in entry["host_explanations"].items():
                lines.append(f"  host {name}: {text}")
    return "\n".join(lines)


def guide_report() -> dict:
    """The guide's quick-reference table beside our estimate for the same sizes, with the note on the difference."""
    from advisor import memory

    rows = [
        {"size": row.size, "model_id": row.model_id, "method": row.method,
         "guide_bytes": int(row.guide_bytes), "estimate_bytes": int(row.estimate_bytes)}
        for row in memory.guide_table()
    ]
    return {"rows": rows, "note": memory.GUIDE_TABLE_NOTE,
            "our_setup": "micro-batch 1, 512 tokens, sdpa; full = mixed-precision AdamW, LoRA/QLoRA r16 on attention"}


def format_guide_report(guide: dict) -> str:
    """The guide table as text: one line per size, guide figure then ours, per method."""
    lines = ["", "The guide's quick-reference table beside our estimate (GB, total the GPU must hold; "
             f"ours: {guide['our_setup']}):", "",
             f"{'size':<5}  {'full: guide':>11}  {'ours':>7}  {'lora: guide':>11}  {'ours':>7}  {'qlora: guide':>12}  {'ours':>7}"]
    by_size: dict[str, dict[str, dict]] = {}
    for row in guide["rows"]:
        by_size.setdefault(row["size"], {})[row["method"]] = row
    for size, methods in by_size.items():
        cells = []
        for method, width in (("full", 11), ("lora", 11), ("qlora", 12)):
            row = methods[method]
            cells.append(f"{row['guide_bytes'] / 1e9:>{width}.0f}  {row['estimate_bytes'] / 1e9:>7.1f}")
        lines.append(f"{size:<5}  " + "  ".join(cells))
    lines += ["", guide["note"]]
    return "\n".join(lines)


def cmd_plan(args) -> int:
    report = build_plan_report(args)
    if args.guide:
        report["guide_table"] = guide_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        text = format_plan_report(report, explain=args.explain)
        if args.guide:
            text += "\n" + format_guide_report(report["guide_table"])
        print(text)
    return 0


# -- recommend -----------------------------------------------------------------------------------------


def _parse_set(items: list[str]) -> dict[str, Any]:
    """--set NAME=VALUE pairs; values parsed as YAML scalars (32 -> int, 2e-4 -> float, true -> bool)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise TunewiseError(f"--set {item!r}: write NAME=VALUE, e.g. --set lora_rank=32", field="set")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and "," in value:
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        out[name.strip()] = value
    return out


def cmd_recommend(args) -> int:
    from advisor.recommend import AdvisorInputs, format_recommendation, recommend

    inputs = AdvisorInputs(
        model=args.model,
        examples=args.examples,
        tokens=args.tokens,
        task=args.task,
        domain_shift=args.domain_shift,
        gpu=args.gpu,
        gpu_memory_gb=args.gpu_memory_gb,
        num_gpus=args.gpus,
        num_nodes=args.nodes,
        priority=args.priority,
        quantized_inference=args.quantized_inference,
        stage=args.stage,
        pipeline=args.pipeline,
        will_merge=args.will_merge,
        preserve_original=args.preserve_original,
        seq_len=args.seq_len,
        sft_model=args.sft_model,
        completion_tokens=args.completion_tokens,
        dataset=args.dataset,
    )
    rec = recommend(inputs, _parse_set(args.set))
    saved = None
    if args.save:
        plan = rec.to_plan()
        saved = str(plan.save(args.save))
    if args.json:
        out = rec.to_dict()
        if saved:
            out["saved"] = saved
        print(json.dumps(out, indent=2))
    else:
        print(format_recommendation(rec))
        if saved:
            print(f"plan written to {saved}")
    return 0


# -- profile -------------------------------------------------------------------------------------------


def cmd_profile(args) -> int:
    from advisor.profile import format_profile, profile_dataset

    profile = profile_dataset(args.dataset, model=args.model, max_rows=args.max_rows, expected_format=args.format)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
    else:
        print(format_profile(profile))
    return 0
