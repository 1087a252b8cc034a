"""SFT stage end to end on the CPU, in this process (the runner's `run`), on the tiny random Llama.

Full, LoRA and QLoRA each train a few steps and their loss falls; the events
have the documented kinds and keys; the same seed gives the same losses;
bad plans fail before training with a message naming the problem; merging a
LoRA adapter reproduces base + adapter, and a QLoRA adapter is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import tiny_plan

from advisor.errors import TunewiseError
from trainer.events import read_all_events

pytestmark = pytest.mark.slow


def run_in_process(plan, run_dir: Path) -> tuple[int, list[dict]]:
    """Write `plan` into `run_dir` and run it with the runner here; return (exit code, events).

    One torch thread: on a shared 2-core machine two threads per tiny matmul mostly wait
    for each other (7x slower per step under load, measured); alone it is as fast.
    """
    import torch

    from trainer.runner import run

    run_dir.mkdir(parents=True, exist_ok=True)
    plan.save(run_dir / "plan.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run(run_dir)
    finally:
        torch.set_num_threads(threads)
    return code, read_all_events(run_dir / "events.jsonl")


def of_kind(events: list[dict], kind: str) -> list[dict]:
    return [event for event in events if event["event"] == kind]


def losses(events: list[dict]) -> list[float]:
    return [event["loss"] for event in of_kind(events, "log")]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """A LoRA run on chat messages: 8 steps, a checkpoint at step 4."""
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    plan = tiny_plan(tiny_model_dir, tiny_data_dir, {"training.save_steps": 4})
    code, events = run_in_process(plan, run_dir)
    return run_dir, code, events


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    """A QLoRA run (4-bit NF4 base on the CPU), bf16 asked for: the CPU trains in fp32 and says so."""
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    plan = tiny_plan(
        tiny_model_dir,
        tiny_data_dir,
        {"method.method": "qlora", "method.precision": "bf16", "method.optimizer": "paged_adamw_8bit",
         "training.learning_rate": 1e-2},
    )
    code, events = run_in_process(plan, run_dir)
    return run_dir, code, events


def test_lora_run_writes_every_event_and_the_loss_falls(lora_run):
    run_dir, code, events = lora_run
    assert code == 0, events[-1]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert kinds.count("finished") == 1 and "failed" not in kinds and "stopped" not in kinds
    for event in events:
        assert {"event", "time", "step"} <= set(event)

    started = events[0]
    assert started["pid"] > 0 and started["torch"] and started["stage"] == "sft" and started["method"] == "lora"
    begin = of_kind(events, "train_begin")[0]
    assert begin["max_steps"] == 8 and "num_train_epochs" in begin
    logs = of_kind(events, "log")
    assert [event["step"] for event in logs] == list(range(1, 9))
    for event in logs:
        assert {"loss", "learning_rate", "grad_norm", "epoch"} <= set(event)
    assert logs[0]["learning_rate"] == pytest.approx(5e-3)  # constant schedule, no warmup

    checkpoints = of_kind(events, "checkpoint")
    assert [event["step"] for event in checkpoints] == [4, 8]
    assert (Path(checkpoints[0]["path"]) / "trainer_state.json").is_file()

    loaded = of_kind(events, "model_loaded")[0]
    # LoRA rank 8 on all 7 linear layers of 2 blocks: q (64->64), k, v (64->32), o (64->64),
    # gate, up (64->128), down (128->64); each adds r x (in + out) weights.
    per_block = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert loaded["trainable_params"] == 2 * per_block

    finished = events[-1]
    assert finished["last_loss"] < finished["first_loss"] - 0.2
    output = Path(finished["output_dir"])
    assert (output / "adapter_config.json").is_file() and (output / "tokenizer.json").is_file()


def test_full_fine_tuning_on_prompt_completion_with_eval(tmp_path, make_plan, tiny_data_dir):
    plan = make_plan(
        {
            "method.method": "full",
            "data.dataset": str(tiny_data_dir / "prompt_completion.jsonl"),
            "data.eval_fraction": 0.25,
            "training.learning_rate": 2e-3,
            "training.max_steps": 6,
        }
    )
    code, events = run_in_process(plan, tmp_path / "run")
    assert code == 0, events[-1]
    loaded = of_kind(events, "model_loaded")[0]
    assert loaded["trainable_params"] == loaded["total_params"]
    assert loaded["train_examples"] == 36 and loaded["eval_examples"] == 12  # 25% of 48 held out
    values = losses(events)
    assert len(values) == 6 and values[-1] < values[0] - 0.3
    evaluation = of_kind(events, "eval")
    assert len(evaluation) == 1 and evaluation[0]["eval_loss"] > 0
    output = Path(events[-1]["output_dir"])
    assert (output / "config.json").is_file() and (output / "model.safetensors").is_file()


def test_qlora_trains_a_4bit_base_and_the_loss_falls(qlora_run):
    run_dir, code, events = qlora_run
    assert code == 0, events[-1]
    loaded = of_kind(events, "model_loaded")[0]
    assert loaded["quantized_bits"] == 4 and loaded["weights_dtype"] == "float32"
    notices = [event["message"] for event in of_kind(events, "notice")]
    assert any("CPU" in message and "fp32" in message for message in notices)
    values = losses(events)
    assert len(values) == 8 and values[-1] < values[0] - 0.2
    config = json.loads((run_dir / "output" / "adapter_config.json").read_text())
    assert config["r"] == 8


def test_same_seed_gives_the_same_losses(tmp_path, make_plan, tiny_data_dir):
    settings = {"data.dataset": str(tiny_data_dir / "text.jsonl"), "data.packing": True, "training.max_steps": 4}
    first = losses(run_in_process(make_plan(settings), tmp_path / "a")[1])
    second = losses(run_in_process(make_plan(settings), tmp_path / "b")[1])
    other = losses(run_in_process(make_plan({**settings, "training.seed": 1}), tmp_path / "c")[1])
    assert len(first) == 4
    assert first == second
    assert first != other


DEMO_LEARNING_RATES = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_the_demo_model_learns_the_demo_task(method, demo_model_dir, tmp_path):
    """The bundled demo model on the bundled date-formatting chats: 8 steps cut the loss by a third."""
    from advisor.plan import Plan

    plan = Plan().with_overrides(
        {
            "model.name": "demo",
            "data.dataset": "demo-sft",
            "data.max_examples": 200,
            "data.eval_fraction": 0.0,
            "method.method": method,
            "method.precision": "bf16" if method == "qlora" else "fp32",
            "training.learning_rate": DEMO_LEARNING_RATES[method],
            "training.lr_scheduler": "constant",
            "training.warmup_ratio": 0.0,
            "training.max_steps": 8,
            "training.micro_batch": 8,
            "training.seq_len": 64,
            "forgetting.monitor": False,
            "hardware.device": "cpu",
        }
    )
    code, events = run_in_process(plan, tmp_path / "run")
    assert code == 0, events[-1]
    values = losses(events)
    assert len(values) == 8
    # Measured on the demo model (micro-batch 8): 6.3 -> 3.1 (LoRA), 2.6 (full), 3.2 (QLoRA) after 8 steps.
    assert values[-1] < values[0] * 2 / 3, values


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BAD_PLANS = [
    ("unknown model", {"model": {"name": "no-such-org/no-such-model-xyz"}}, "no-such-model-xyz"),
    ("missing dataset", {"data": {"dataset": "{tmp}/missing.jsonl"}}, "missing.jsonl does not exist"),
    ("wrong columns", {"data": {"dataset": "{tmp}/columns.jsonl"}}, "from its columns (question, reply)"),
    ("malformed JSON line 3", {"data": {"dataset": "{tmp}/broken.jsonl"}}, "line 3 of broken.jsonl is not valid JSON"),
    ("rank 0", {"method": {"lora_rank": 0}}, "method.lora_rank"),
    ("negative learning rate", {"training": {"learning_rate": -1e-4}}, "training.learning_rate"),
    ("zero learning rate", {"training": {"learning_rate": 0}}, "training.learning_rate"),
    ("sequence longer than the model", {"training": {"seq_len": 4096}}, "training.seq_len"),
    ("EWC strength infinity", {"forgetting": {"ewc_lambda": float("inf")}}, "forgetting.ewc_lambda"),
    ("EWC strength NaN", {"forgetting": {"ewc_lambda": float("nan")}}, "forgetting.ewc_lambda"),
    ("micro-batch 10 million", {"training": {"micro_batch": 10_000_000}}, "training.micro_batch: must be a whole number from 1 to 65,536"),
]


@pytest.mark.parametrize("label,changes,expected", BAD_PLANS, ids=[case[0] for case in BAD_PLANS])
def test_bad_plans_fail_before_training(label, changes, expected, tmp_path, tiny_model_dir, tiny_data_dir):
    import yaml

    from conftest import tiny_plan_dict

    _write(tmp_path / "columns.jsonl", '{"question": "a?", "reply": "b"}\n' * 4)
    _write(tmp_path / "broken.jsonl", '{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    data = tiny_plan_dict(tiny_model_dir, tiny_data_dir)
    for group, values in changes.items():
        data[group].update({key: value.format(tmp=tmp_path) if isinstance(value, str) else value for key, value in values.items()})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Written as YAML directly: a bad value must be caught by the runner, whoever wrote the file.
    (run_dir / "plan.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")

    from trainer.runner import run

    began = time.monotonic()
    code = run(run_dir)
    elapsed = time.monotonic() - began
    events = read_all_events(run_dir / "events.jsonl")
    kinds = [event["event"] for event in events]
    assert code == 2
    assert kinds == ["started", "failed"], kinds
    failed = events[-1]
    assert expected in failed["error"], failed["error"]
    assert failed["user_error"] is True and "traceback" not in failed
    assert elapsed < 30  # nothing was loaded or trained


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_run_whose_loss_turns_nan_fails_with_an_alert_and_saves_nothing(method, tmp_path, poisoned_model_dir,
                                                                         tiny_data_dir):
    """A model with one infinite weight (a damaged download) gives a NaN loss at the first step: the run must
    end `failed` saying what went non-finite where and what to do, with an alert, no checkpoint of the broken
    weights and no output, never `finished` (as it did, with loss 0.0, before)."""
    plan = tiny_plan(poisoned_model_dir, tiny_data_dir, {"method.method": method, "training.save_steps": 1})
    run_dir = tmp_path / "run"
    code, events = run_in_process(plan, run_dir)
    kinds = [event["event"] for event in events]
    assert code == 2, events[-1]
    assert kinds[-1] == "failed" and "finished" not in kinds and "stopped" not in kinds, kinds
    failed = events[-1]
    assert failed["user_error"] is True and "traceback" not in failed
    assert "training diverged at step 1: loss is nan, grad_norm is nan" in failed["error"], failed["error"]
    assert "lower the learning rate (now 0.005)" in failed["error"] and "check the data" in failed["error"]
    alerts = of_kind(events, "alert")
    assert len(alerts) == 1 and alerts[0]["kind"] == "non_finite" and alerts[0]["step"] == 1
    assert alerts[0]["message"] == failed["error"] and alerts[0]["non_finite"] == ["grad_norm", "loss"]
    assert of_kind(events, "log")[0]["loss"] is None  # logged as it was (JSON has no NaN), not as 0.0
    assert not of_kind(events, "checkpoint") and not list((run_dir / "checkpoints").glob("checkpoint-*"))
    assert not (run_dir / "output").exists()

    from trainer import supervisor

    status = supervisor.status(run_dir.name, run_dir.parent)
    assert status.state == "failed" and "training diverged at step 1" in status.error


def test_fp16_loss_scaler_overflows_are_tolerated_until_they_persist(tmp_path, make_plan):
    """Under fp16 autocast the loss scaler skips a step whose gradients overflowed (an infinite gradient norm
    with a finite loss): normal at the start of fp16 training, so only FP16_OVERFLOW_LOGS in a row fail the
    run. (The rule, driven by the Trainer's own argument and state objects: fp16 needs a GPU to train.)"""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trainer.callbacks import FP16_OVERFLOW_LOGS, NonFiniteCallback, NonFiniteTraining
    from trainer.context import RunContext
    from trainer.events import EventWriter

    ctx = RunContext(plan=make_plan(), run_dir=tmp_path, events=EventWriter(tmp_path / "events.jsonl"))
    state, control = TrainerState(), TrainerControl()
    fp16 = TrainingArguments(output_dir=str(tmp_path / "out"), fp16=True, use_cpu=True, report_to="none")
    fp32 = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    inf, nan = float("inf"), float("nan")

    def feed(guard, args, step, **logs):
        state.global_step = step
        guard.on_log(args, state, control, logs=logs)

    guard = NonFiniteCallback(ctx)
    for step in range(1, FP16_OVERFLOW_LOGS):  # 9 overflows in a row: skipped steps, not divergence
        feed(guard, fp16, step, loss=2.5, grad_norm=inf)
    feed(guard, fp16, 10, loss=2.4, grad_norm=3.0)  # the scale came down: a finite step restarts the count
    last = 10 + FP16_OVERFLOW_LOGS
    for step in range(11, last):
        feed(guard, fp16, step, loss=2.5, grad_norm=inf)
    with pytest.raises(NonFiniteTraining, match=f"at step {last}: grad_norm is inf"):
        feed(guard, fp16, last, loss=2.5, grad_norm=inf)  # the 10th in a row
    with pytest.raises(NonFiniteTraining, match="at step 50: loss is nan.*float16 overflows above 65504: use bf16"):
        feed(NonFiniteCallback(ctx), fp16, 50, loss=nan, grad_norm=1.0)  # a NaN loss fails at once
    with pytest.raises(NonFiniteTraining, match="at step 60: grad_norm is inf"):
        feed(NonFiniteCallback(ctx), fp32, 60, loss=2.5, grad_norm=inf)  # no loss scaler: at once
    alerts = [e for e in read_all_events(tmp_path / "events.jsonl") if e["event"] == "alert"]
    assert [(a["kind"], a["step"]) for a in alerts] == [("non_finite", last), ("non_finite", 50), ("non_finite", 60)]


def test_non_finite_trained_weights_at_the_end_fail_the_run(tmp_path, make_plan, poisoned_model_dir, tiny_model_dir):
    """The last check, when training ends (steps that were not logged; weights that were never finite): the
    trainable weights of the model the Trainer hands over. Frozen weights are not this run's product."""
    from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

    from trainer.callbacks import NonFiniteCallback, NonFiniteTraining
    from trainer.context import RunContext
    from trainer.events import EventWriter

    ctx = RunContext(plan=make_plan(), run_dir=tmp_path, events=EventWriter(tmp_path / "events.jsonl"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    state = TrainerState()
    state.global_step = 8
    NonFiniteCallback(ctx).on_train_end(args, state, TrainerControl(), model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    broken = AutoModelForCausalLM.from_pretrained(poisoned_model_dir)
    with pytest.raises(NonFiniteTraining, match=r"at step 8: the trained weights hold NaN or infinite values "
                                                r"\(1 tensors, e.g. model.layers.0.mlp.down_proj.weight\)"):
        NonFiniteCallback(ctx).on_train_end(args, state, TrainerControl(), model=broken)
    broken.model.layers[0].mlp.down_proj.weight.requires_grad_(False)  # frozen: not this run's weights
    NonFiniteCallback(ctx).on_train_end(args, state, TrainerControl(), model=broken)


def test_merge_reproduces_base_plus_adapter(lora_run, tmp_path):
    from trainer.merge import merge_and_export

    run_dir, code, _ = lora_run
    assert code == 0
    report = merge_and_export(run_dir, tmp_path / "merged")
    # Folding B.A into bfloat16 weights only rounds them: far below what the adapter changed.
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert report["max_abs_logit_diff"] < report["adapter_effect"] / 10
    assert report["adapter_effect"] > 0.05
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "merge_report.json").read_text())["max_abs_logit_diff"] == report["max_abs_logit_diff"]

    # An impossible tolerance fails the export, and nothing is written.
    with pytest.raises(TunewiseError, match="disagrees with base"):
        merge_and_export(run_dir, tmp_path / "strict", tolerance=0.0)
    assert not (tmp_path / "strict").exists()


def test_merge_refuses_a_qlora_adapter_and_explains(qlora_run, tmp_path):
    from trainer.merge import merge_and_export

    run_dir, code, _ = qlora_run
    assert code == 0
    with pytest.raises(TunewiseError) as raised:
        merge_and_export(run_dir, tmp_path / "merged")
    message = str(raised.value)
    assert "4-bit" in message and "keep the adapter separate" in message and "--reload-16bit" in message
    assert not (tmp_path / "merged").exists()


def test_dora_trains_and_peft_counts_what_the_planner_counts(tmp_path, make_plan, tiny_model_dir):
    """DoRA (method.use_dora) trains through PEFT: the saved adapter is a DoRA adapter (a magnitude vector per
    adapted module), PEFT's own trainable count of it equals the planner's, and the loss falls."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from advisor import memory, specs

    plan = make_plan({"method.use_dora": True})
    code, events = run_in_process(plan, tmp_path / "run")
    assert code == 0, events[-1]
    values = losses(events)
    assert values[-1] < values[0] - 0.2
    output = Path(events[-1]["output_dir"])
    assert json.loads((output / "adapter_config.json").read_text())["use_dora"] is True
    weights = load_file(output / "adapter_model.safetensors")
    magnitudes = [name for name in weights if "lora_magnitude_vector" in name]
    assert len(magnitudes) == 2 * 7  # every linear layer of both blocks

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), output, is_trainable=True)
    trainable, _ = model.get_nb_trainable_parameters()
    spec = specs.spec_from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()), "tiny")
    planned = memory.estimate(spec, memory.setup_from_plan(plan))
    assert planned.trainable_params == trainable == of_kind(events, "model_loaded")[0]["trainable_params"]
    # LoRA rank 8 on the 7 linear layers of 2 blocks, plus one magnitude per output feature of each.
    per_block = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64)) + (64 + 32 * 2 + 64 + 128 * 2 + 64)
    assert trainable == 2 * per_block
    lora = memory.estimate(spec, memory.setup_from_plan(plan.with_overrides({"method.use_dora": False})))
    assert planned.components["activations"] > lora.components["activations"]
    assert planned.components["overhead"] > lora.components["overhead"]


def test_dora_is_refused_for_full_fine_tuning(make_plan):
    from advisor.plan import PlanError

    with pytest.raises(PlanError, match="method.use_dora: DoRA is a kind of LoRA adapter.*choose method lora or qlora"):
        make_plan({"method.use_dora": True, "method.method": "full"})


def test_tensorboard_gets_the_loss_that_events_record(tmp_path, make_plan):
    """training.report_to = tensorboard: transformers' TensorBoard callback writes event files into
    <run>/tensorboard, and TensorBoard's own reader finds the loss of every logged step in them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    code, events = run_in_process(make_plan({"training.report_to": "tensorboard", "training.max_steps": 4}), run_dir)
    assert code == 0, events[-1]
    files = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert files, sorted(p.name for p in run_dir.iterdir())
    reader = EventAccumulator(str(files[0].parent))
    reader.Reload()
    assert "train/loss" in reader.Tags()["scalars"]
    scalars = reader.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3, 4]
    assert [s.value for s in scalars] == pytest.approx(losses(events), rel=1e-5)


@pytest.mark.parametrize("logger", ["trackio", "wandb"])
def test_a_missing_experiment_logger_is_refused_before_training(tmp_path, make_plan, logger):
    import importlib.util

    if importlib.util.find_spec(logger) is not None:
        pytest.skip(f"{logger} is installed here")
    code, events = run_in_process(make_plan({"training.report_to": logger}), tmp_path / "run")
    assert code == 2
    failed = events[-1]
    assert failed["event"] == "failed" and failed.get("user_error") is True
    assert f"training.report_to: {logger} is not installed here: run `pip install {logger}`" in failed["error"] and failed["field"] == "training.report_to"
    assert not of_kind(events, "model_loaded")


def test_wandb_without_a_login_is_refused_with_the_offline_way(tmp_path, make_plan, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code, events = run_in_process(make_plan({"training.report_to": "wandb"}), tmp_path / "run")
    assert code == 2 and "set WANDB_API_KEY" in events[-1]["error"] and "WANDB_MODE=offline" in events[-1]["error"]


def test_early_stopping_stops_when_eval_loss_stops_improving_and_keeps_the_best(tmp_path, make_plan):
    """A learning rate far too high makes the eval loss turn up after a few steps: with patience 2 the run
    stops two evaluations after its best one, says which step was best, and its output holds that step's weights."""
    from safetensors.torch import load_file

    from trainer.status import derive_status

    plan = make_plan({"training.learning_rate": 0.05, "training.max_steps": 60, "training.eval_steps": 2,
                      "training.save_steps": 3, "training.keep_checkpoints": 1,
                      "training.early_stopping_patience": 2, "data.eval_fraction": 0.25})
    run_dir = tmp_path / "run"
    code, events = run_in_process(plan, run_dir)
    assert code == 0, events[-1]
    notices = " ".join(event["message"] for event in of_kind(events, "notice"))
    assert "checkpoint interval 3 is not a multiple of the eval interval 2, using 2" in notices
    evals = [(event["step"], event["eval_loss"]) for event in of_kind(events, "eval")]
    best_step, best_loss = min(evals, key=lambda pair: pair[1])
    [best] = of_kind(events, "best_checkpoint")
    assert best["step"] == best_step and best["eval_loss"] == pytest.approx(best_loss)
    assert best["early_stopped"] is True and best["stopped_at"] < 60
    assert best["stopped_at"] == best_step + 2 * 2  # two evaluations without improvement
    finished = events[-1]
    assert finished["event"] == "finished" and finished["best_step"] == best_step and finished["early_stopped"] is True
    # The output is the best checkpoint's adapter, not the last step's.
    output = load_file(Path(finished["output_dir"]) / "adapter_model.safetensors")
    kept = load_file(Path(best["path"]) / "adapter_model.safetensors")
    assert output.keys() == kept.keys() and all((output[k] == kept[k]).all() for k in output)
    run_status = derive_status(run_dir)
    assert run_status.best_step == best_step and run_status.early_stopped is True


def test_early_stopping_needs_evaluations_during_training(make_plan):
    from advisor.plan import PlanError

    with pytest.raises(PlanError, match="training.early_stopping_patience: early stopping compares evaluations.*eval_steps"):
        make_plan({"training.early_stopping_patience": 3, "data.eval_fraction": 0.25})
    with pytest.raises(PlanError, match="needs held-out data.*data.eval_fraction"):
        make_plan({"training.early_stopping_patience": 3, "training.eval_steps": 2})
