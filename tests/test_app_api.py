"""The wizard's API, driven with gradio_client against a real `python app.py` server.

One server in demo mode (the limits a public Space enforces) serves every test
here: planning endpoints with real numbers, clear messages for bad input, the
demo limits refused or applied on the server, and one short launch -> poll ->
stop -> history round trip on the bundled demo model.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml

from conftest import start_app, stop_app

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "assets" / "demo-model" / "config.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    proc, url = start_app(runs, "--demo-mode", log_path=runs.parent / "app.log")
    from gradio_client import Client

    yield Client(url, verbose=False), runs
    # Stop any run this module left going, then the server.
    from trainer import supervisor

    for status in supervisor.list_runs(runs):
        if status.state in ("queued", "running"):
            supervisor.stop(status.run_id, runs_dir=runs, timeout=20)
    stop_app(proc)


def table(value) -> tuple[list[str], list[list]]:
    """(headers, rows) of a Dataframe output."""
    return value["headers"], value["data"]


def test_the_running_app_writes_nothing_beside_its_code(server):
    # e.g. Gradio writes a .pyi stub next to any module that subclasses one of its components.
    repo = Path(__file__).resolve().parent.parent
    assert not list(repo.glob("*.pyi")), "the app wrote stub files into the repository"


def test_model_info_gives_exact_parameter_count(server):
    client, _ = server
    card = client.predict("HuggingFaceTB/SmolLM2-135M", api_name="/model_info")
    assert "134,515,008" in card and "llama" in card


def test_estimate_returns_memory_fit_and_commands(server):
    client, _ = server
    memory, chart, fits, _recs, status, _explained, cli, plan_yaml, pilot_cost = client.predict(
        model="meta-llama/Llama-2-7b-hf", gpu="RTX-4090", method="lora", micro_batch=4, seq_len=512,
        api_name="/estimate")
    # The learning-rate check says before the click what it would cost, or why it cannot run for this plan:
    # with no max steps and no dataset profile the run's length (which its budget is a share of) is unknown;
    # 30 steps of ~0.5 s on a 4090 are known: a tenth of that would buy mostly loading, so the one-minute floor
    # applies, and the page says so with the cost.
    assert "the run's length is unknown" in pilot_cost and "--max-steps" in pilot_cost
    short = client.predict(model="meta-llama/Llama-2-7b-hf", gpu="RTX-4090", method="lora", micro_batch=4,
                           seq_len=512, max_steps=30, api_name="/estimate")[-1]
    assert "5 rates x" in short and "the 60 s floor" in short and "**Expected cost: about" in short
    headers, rows = table(memory)
    assert headers == ["component (GB per GPU)", "Full", "LoRA", "QLoRA"]
    weights = next(r for r in rows if r[0] == "weights")
    # 6,738,415,616 parameters x 2 bytes (16 bit) = 13.48 GB for Full and LoRA; NF4 is far less for QLoRA.
    assert weights[1] == weights[2] == "13.48" and float(weights[3]) < 5
    totals = next(r for r in rows if r[0] == "total on the GPU")
    assert float(totals[1]) > float(totals[2]) > float(totals[3])
    fit_headers, fit_rows = table(fits)
    assert fit_headers[:4] == ["GPU", "GB", "method", "fits"]
    mine = next(r for r in fit_rows if r[0].startswith("RTX-4090"))
    assert mine[3] == "no" and "gradient checkpointing" in mine[6].lower()
    assert "does not fit your RTX-4090" in status
    assert json.loads(chart["plot"])["layout"]["barmode"] == "stack"
    assert "tunewise train --model meta-llama/Llama-2-7b-hf --dataset demo-sft --method lora" in cli
    assert "tunewise train plan.yaml" in cli
    plan = yaml.safe_load(plan_yaml)
    assert plan["model"]["name"] == "meta-llama/Llama-2-7b-hf" and plan["hardware"]["gpu"] == "RTX-4090"


def test_recommend_follows_the_guide_rank_table(server):
    client, _ = server
    outputs = client.predict(model="HuggingFaceTB/SmolLM2-135M", task="classification", api_name="/recommend")
    from advisor.wizard import ADVISED_WIDGETS

    values = dict(zip(ADVISED_WIDGETS, outputs[: len(ADVISED_WIDGETS)]))
    assert values["lora_targets"]["choices"][0][0] == "q_proj"  # the architecture's own module names
    assert values["method"] == "lora"
    assert 4 <= values["lora_rank"] <= 8  # guide: simple (classification) -> 4-8
    # The evidence's rate for a 135M model (Tinker's sweep moved by 1/sqrt(parameters)), not the guide's 1e-4
    # to 3e-4 for 7B-class models (advisor/recommend.py shows both in the reason).
    from advisor import specs
    from advisor.recommend import evidence_learning_rate

    params = specs.param_counts(specs.resolve_model("HuggingFaceTB/SmolLM2-135M")).total
    assert values["learning_rate"] == evidence_learning_rate("lora", params)[0] > 3e-4
    guide_headers, guide_rows = table(outputs[len(ADVISED_WIDGETS)])
    assert [row[0].split()[0] for row in guide_rows] == ["7B", "13B", "70B"]
    assert guide_rows[0][1] == "28"  # the guide's own figure, shown as it gives it
    assert "AdamW" in outputs[len(ADVISED_WIDGETS) + 1]


def test_profile_of_bundled_dataset(server):
    client, _ = server
    rows, histogram = client.predict(dataset="demo-sft", model="HuggingFaceTB/SmolLM2-135M", api_name="/profile")
    found = dict((r[0], r[1]) for r in table(rows)[1])
    assert found["format"] == "messages" and found["examples"] == "2,000"
    bars = json.loads(histogram["plot"])["data"][0]
    assert sum(bars["y"]) == 2000


def test_bad_input_gives_a_message_naming_the_field(server):
    from gradio_client.exceptions import AppError

    client, _ = server
    with pytest.raises(AppError) as bad_lr:
        client.predict(model="HuggingFaceTB/SmolLM2-135M", learning_rate=-1, api_name="/estimate")
    assert "training.learning_rate" in str(bad_lr.value) and "Traceback" not in str(bad_lr.value)
    with pytest.raises(AppError) as bad_model:
        client.predict("no-such-model-xyz", api_name="/model_info")
    assert "unknown model" in str(bad_model.value) and "Traceback" not in str(bad_model.value)


def test_demo_mode_refuses_other_models_on_the_server(server):
    from gradio_client.exceptions import AppError

    client, runs = server
    with pytest.raises(AppError) as refused:
        client.predict(model="HuggingFaceTB/SmolLM2-135M", max_steps=5, api_name="/launch")
    assert "model.name" in str(refused.value) and "demo" in str(refused.value)
    assert not [p for p in runs.iterdir() if (p / "run.json").exists()]
    # Nor does it read files on the server: only bundled datasets or uploads.
    with pytest.raises(AppError) as server_file:
        client.predict(dataset="/etc/passwd", model="demo", api_name="/profile")
    assert "data.dataset" in str(server_file.value) and "upload" in str(server_file.value)


@pytest.mark.slow
def test_launch_poll_stop_and_history(server):
    from gradio_client.exceptions import AppError

    client, runs = server
    if not DEMO_MODEL.is_file():
        pytest.fail("the bundled demo model (assets/demo-model) is missing: build it with assets/build_demo_model.py")
    # Ask for more steps than the demo allows: the server cuts the plan to its limit.
    from advisor.wizard import DemoLimits

    client.predict(model="demo", dataset="demo-sft", method="lora", max_steps=50_000, seq_len=64, micro_batch=4,
                   api_name="/launch")
    (run_dir,) = [p for p in runs.iterdir() if (p / "plan.yaml").exists() and not (p / "pilot.json").exists()]
    assert yaml.safe_load((run_dir / "plan.yaml").read_text())["training"]["max_steps"] == DemoLimits().max_steps
    # One job at a time: a second launch gets the queue message.
    with pytest.raises(AppError) as queued:
        client.predict(model="demo", dataset="demo-sft", max_steps=5, api_name="/launch")
    assert "one run at a time" in str(queued.value)

    points, deadline = [], time.time() + 240
    while time.time() < deadline and len(points) < 2:
        header, loss, *_ = client.predict(api_name="/poll")
        if isinstance(loss, dict) and loss.get("plot"):
            traces = json.loads(loss["plot"])["data"]
            points = next((t["y"] for t in traces if t.get("name") == "training loss"), [])
        time.sleep(1)
    assert len(points) >= 2, f"no loss points within 240 s; last header: {header}"
    assert all(math.isfinite(v) and v > 0 for v in points)
    # A running run is not deleted: the page says to stop it first, and asks nothing.
    client.predict(api_name="/runs")  # the history lists it (the run picker's choices)
    with pytest.raises(AppError, match=f"{run_dir.name} is still running; stop it in step 4 before deleting it"):
        client.predict(run_dir.name, api_name="/delete")

    client.predict(api_name="/stop")
    deadline = time.time() + 90
    while time.time() < deadline:
        header = client.predict(api_name="/poll")[0]
        if "tw-badge-stopped" in header or "tw-badge-finished" in header:
            break
        time.sleep(1)
    assert "tw-badge-stopped" in header or "tw-badge-finished" in header, header
    history, _run_choice, _compare = client.predict(api_name="/runs")
    headers, (row,) = table(history)
    row = dict(zip(headers, row))
    assert row["run"] == run_dir.name and row["status"] in ("stopped", "finished")
    step, total = (int(x) for x in row["step"].split("/"))
    assert total == DemoLimits().max_steps and step >= len(points)


def _an_ended_run(client, runs) -> Path:
    """This visitor's run from the launch test, or (a test run on its own) a short one trained now; ended."""
    from conftest import wait_for
    from trainer import supervisor

    mine = [p for p in runs.iterdir() if (p / "plan.yaml").exists()]
    if not mine:
        client.predict(model="demo", dataset="demo-sft", method="lora", max_steps=4, seq_len=64, micro_batch=4,
                       api_name="/launch")
        mine = [p for p in runs.iterdir() if (p / "plan.yaml").exists()]
    wait_for(lambda: not supervisor.status(mine[0].name, runs).active, 240, "the run to end")
    client.predict(api_name="/runs")
    return mine[0]


def test_the_adapter_downloads_alone_with_its_config(server, tmp_path):
    """Step 5's "Download the adapter": a zip of the run's adapter (adapter_config.json and its weights, the
    tokenizer), byte for byte what the run saved, and no whole model, optimizer or trainer state."""
    import zipfile

    from trainer import supervisor

    client, runs = server
    run_dir = _an_ended_run(client, runs)
    note, archive = client.predict(run_dir.name, None, api_name="/download_adapter")
    assert "adapter alone" in note and "adapter_config.json" in note and "PeftModel.from_pretrained" in note
    with zipfile.ZipFile(archive) as zipped:
        names = set(zipped.namelist())
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "optimizer.pt", "trainer_state.json",
                            "training_args.bin", "scheduler.pt"}
        saved = supervisor.status(run_dir.name, runs).output_dir or str(run_dir / "output")
        if not (Path(saved) / "adapter_model.safetensors").is_file():  # stopped before saving: its checkpoint
            saved = str(sorted((run_dir / "checkpoints").glob("checkpoint-*"))[-1])
        assert zipped.read("adapter_model.safetensors") == (Path(saved) / "adapter_model.safetensors").read_bytes()
        assert json.loads(zipped.read("adapter_config.json"))["peft_type"] == "LORA"
    whole_model = sum(p.stat().st_size for p in (REPO / "assets" / "demo-model").glob("*.safetensors"))
    assert Path(archive).stat().st_size < whole_model / 2


def test_runs_are_renamed_tagged_filtered_and_deleted_after_asking(server):
    from gradio_client.exceptions import AppError

    client, runs = server
    run_id = _an_ended_run(client, runs).name
    state = json.loads((runs / run_id / "events.jsonl").read_text().splitlines()[-1])["event"]
    history, _choice, _compare, note = client.predict(run_id, "my first demo", "all", "all", "all",
                                                      api_name="/rename_run")
    assert note == f"**{run_id}**: my first demo."
    client.predict(run_id, "baseline", "all", "all", "all", api_name="/tag_run")
    history, _choice, _compare, note = client.predict(run_id, "demo", "all", "all", "all", api_name="/tag_run")
    assert note == f"**{run_id}**: my first demo #baseline #demo."
    headers, rows = table(history)
    assert dict(zip(headers, rows[0]))["name / tags"] == "my first demo #baseline #demo"
    assert json.loads((runs / run_id / "meta.json").read_text()) == {"name": "my first demo", "tags": ["baseline", "demo"]}
    with pytest.raises(AppError, match="tag: 'not one word' is not a tag"):
        client.predict(run_id, "not one word", "all", "all", "all", api_name="/tag_run")

    def shown(tag="all", stage="all", run_state="all"):
        history, *_ = client.predict(tag, stage, run_state, api_name="/runs")
        return [row[0] for row in table(history)[1]]

    assert shown() == [run_id]
    assert shown(tag="baseline") == [run_id] and shown(tag="other") == []
    assert shown(stage="sft") == [run_id] and shown(stage="dpo") == [] and shown(stage="pipeline:rlhf") == []
    assert shown(run_state=state) == [run_id] and shown(run_state="failed") == []
    assert shown(tag="baseline", stage="sft", run_state=state) == [run_id]
    client.predict(run_id, "demo", "all", "all", "all", api_name="/untag_run")
    assert shown(tag="demo") == [] and shown(tag="baseline") == [run_id]

    # Deleting asks first: the first click only asks; the confirmation deletes.
    note = client.predict(run_id, api_name="/delete")  # (the confirmation button, shown, has no value)
    assert f"Delete **{run_id}** ({state})" in note and "cannot be undone" in note and (runs / run_id).is_dir()
    client.predict(run_id, api_name="/delete_confirm")
    assert not (runs / run_id).exists() and shown() == []


@pytest.mark.slow
def test_the_learning_rate_check_shows_its_cost_then_fills_in_the_measured_rate(server):
    """The plan step's "Check the learning rate on my data": its cost is shown before the click; the pilot then
    runs in the background, its charts fill, and its chosen rate goes into the plan with what was measured."""
    from gradio_client.exceptions import AppError

    client, runs = server
    plan = dict(model="demo", dataset="demo-sft", method="lora", max_steps=600, micro_batch=8, seq_len=64)
    cost = client.predict(**plan, api_name="/estimate")[-1]
    assert "Expected cost: about" in cost and "rates x" in cost and "budget 60 s (the 60 s floor" in cost
    # The budget box: what it buys is shown before the click, and what is not a budget is refused by its name.
    cost = client.predict(pilot_budget="0.5", **plan, api_name="/pilot_budget")  # (the page state is not returned)
    assert 'budget 30 s ("Check budget (minutes)")' in cost and "Expected cost: about" in cost
    for bad, why in (("soon", "must be a number of minutes"), ("0", "out of range")):
        with pytest.raises(AppError, match=re.escape("Check budget (minutes)") + ".*" + why):
            client.predict(pilot_budget=bad, **plan, api_name="/pilot_budget")
        with pytest.raises(AppError, match=re.escape("Check budget (minutes)")):
            client.predict(**plan, pilot_budget=bad, learning_rate=1e-2, api_name="/pilot")
    assert not any((p / "pilot.json").is_file() for p in runs.iterdir())  # a refused budget starts nothing
    client.predict(**plan, pilot_budget="0.5", learning_rate=1e-2, api_name="/pilot")
    (pilot_dir,) = [p for p in runs.iterdir() if (p / "pilot.json").is_file()]
    status, outputs, deadline = "", [], time.time() + 600
    while time.time() < deadline and "**Chosen:" not in status:
        outputs = client.predict(**plan, learning_rate=1e-2, api_name="/pilot_poll")
        status = next((value for value in outputs if isinstance(value, str) and "Pilot" in value), status)
        time.sleep(2)
    assert "**Chosen:" in status, status
    result = json.loads((pilot_dir / "pilot_result.json").read_text())
    assert result["budget_s"] == 30 and result["design"]["budget_source"] == '"Check budget (minutes)"'
    rate = result["chosen_rate"]
    assert rate in [value for value in outputs if isinstance(value, (int, float)) and not isinstance(value, bool)]
    recommendations = next(value for value in outputs if isinstance(value, dict) and value.get("headers") == ["setting", "value", "why"])
    row = next(r for r in recommendations["data"] if r[0] == "Learning rate")
    assert row[2].startswith("pilot: ") and f"chosen {rate:.1e}" in row[2]
    charts = [json.loads(value["plot"]) for value in outputs if isinstance(value, dict) and value.get("plot")]
    assert any(chart["layout"]["xaxis"].get("type") == "log" for chart in charts)  # held-out loss against the rate
def test_next_is_refused_until_the_model_and_the_dataset_can_be_read(server, tmp_path):
    """Step 1 -> 2 needs a model the planner can read, step 2 -> 3 a dataset that reads and checks: otherwise
    the step stays and the message says what to fix (the plan never shows another model's or file's numbers)."""
    from gradio_client.exceptions import AppError

    client, _ = server
    with pytest.raises(AppError, match="unknown model 'no-such-model-xyz'"):
        client.predict("no-such-model-xyz", api_name="/go_data")
    assert client.predict("demo", api_name="/go_data") is not None  # a readable model moves on
    with pytest.raises(AppError, match="data.dataset"):
        client.predict(dataset="not-a-bundled-name", model="demo", api_name="/go_plan")


def test_a_second_launch_on_a_busy_machine_is_refused_with_the_running_run_named(tiny_model_dir, tiny_data_dir,
                                                                                  tmp_path):
    """Outside the demo too: while a run trains here, a second launch would put two runs on one GPU (or CPU)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from conftest import start_app, stop_app, wait_for
    from trainer import supervisor

    runs = tmp_path / "runs"
    proc, url = start_app(runs, "--no-warm-worker", log_path=tmp_path / "app.log")
    try:
        client = Client(url, verbose=False)
        launch = dict(model=str(tiny_model_dir), dataset=str(tiny_data_dir / "messages.jsonl"), gpu="none",
                      method="lora", precision="fp32", max_steps=100_000, seq_len=64, micro_batch=4, api_name="/launch")
        client.predict(**launch)
        (first,) = [p.name for p in runs.iterdir() if (p / "run.json").is_file()]
        wait_for(lambda: supervisor.status(first, runs).state == "running", 120, "the first run to train")
        with pytest.raises(AppError) as refused:
            client.predict(**launch)
        message = str(refused.value)
        assert f"run {first} is running" in message and "this machine's CPU" in message and "stop it" in message
        assert [p.name for p in runs.iterdir() if (p / "run.json").is_file()] == [first]  # nothing was started
    finally:
        for run in supervisor.list_runs(runs) if runs.is_dir() else []:
            if run.active:
                supervisor.stop(run.run_id, runs_dir=runs, timeout=30)
        stop_app(proc)


def test_values_in_range_but_implausible_are_said_in_the_plan_status(server):
    """LR 0.5 for LoRA on the demo model and 100,000 accumulation steps are accepted (in range) but said, next to
    the plan; the ceiling grows for small models, so the demo's own advised rate (0.028) is not questioned."""
    client, _ = server
    outputs = client.predict(model="demo", dataset="demo-sft", learning_rate=0.5, grad_accum=100_000,
                             api_name="/estimate")
    status = outputs[4]
    assert "**Check this:** a learning rate of 0.5 for LoRA is far above" in status
    assert "2.8e-02 is the evidence's rate for this model's size" in status
    assert "400,000 sequences per optimizer step" in status
    plain = client.predict(model="demo", dataset="demo-sft", api_name="/estimate")[4]
    assert "Check this" not in plain
    advised = client.predict(model="demo", dataset="demo-sft", learning_rate=0.028, api_name="/estimate")[4]
    assert "Check this" not in advised
    big = client.predict(model="meta-llama/Llama-3.1-8B", dataset="demo-sft", learning_rate=0.05, api_name="/estimate")[4]
    assert "**Check this:** a learning rate of 0.05 for LoRA is far above" in big


def test_a_pipelines_plan_is_sized_by_its_heaviest_step_as_its_advice_is(server):
    client, _ = server
    sft = client.predict(model="meta-llama/Llama-3.1-8B", dataset="demo-preference", goal="sft", api_name="/estimate")[4]
    rlhf = client.predict(model="meta-llama/Llama-3.1-8B", dataset="demo-preference", goal="pipeline:rlhf",
                          api_name="/estimate")[4]
    assert "sized by its heaviest step, PPO" in rlhf and "heaviest" not in sft
    need = lambda text: float(text.split("needs **")[1].split(" GB")[0])  # noqa: E731
    assert need(rlhf) > 1.5 * need(sft)  # policy, reference, reward and value models, not SFT's one


def test_editing_the_rank_re_advises_what_follows_it_and_keeps_the_users_changes(server):
    from advisor import wizard

    from gradio_client import Client

    client = Client(server[0].src, verbose=False)  # a page of its own: no earlier advice in its session
    model, task = "HuggingFaceTB/SmolLM2-135M", "classification"
    n = len(wizard.ADVISED_WIDGETS)
    advised = dict(zip(wizard.ADVISED_WIDGETS, client.predict(model=model, task=task, api_name="/recommend")[:n]))
    advised["lora_targets"] = advised["lora_targets"]["value"]
    rank = advised["lora_rank"] * 4
    edited = {**advised, "lora_rank": rank, "warmup_ratio": 0.07}  # two edits: the rank, and the warmup by hand
    outputs = client.predict(model=model, task=task, **edited, api_name="/edit_lora_rank")
    after = dict(zip(wizard.ADVISED_WIDGETS, outputs[:n]))
    # What the advisor says for this rank, asked directly: alpha follows the new rank, not the old one.
    direct = wizard.advise({"model": model, "task": task}, None, {"lora_rank": rank, "warmup_ratio": 0.07})
    assert after["lora_rank"] == rank and after["warmup_ratio"] == 0.07  # the user's edits are kept
    # Alpha is the evidence's fixed 32 (the guide's 2 x rank is in its reason), so the rank leaves it alone.
    assert after["lora_alpha"] == direct.plan.method.lora_alpha == advised["lora_alpha"] == 32
    # The recommendations table, refreshed after the re-advice, gives alpha's reason for the new rank.
    recommendations = client.predict(model=model, **{**edited, "lora_alpha": after["lora_alpha"]},
                                     api_name="/estimate")[3]
    alpha_row = next(row for row in recommendations["data"] if row[0].lower().startswith("lora alpha"))
    assert alpha_row[1] == wizard._display(after["lora_alpha"]) and "set by you" not in alpha_row[2], alpha_row
    assert f"at rank {rank})" in alpha_row[2], alpha_row  # the scale alpha / rank at this rank
    assert f"2 x rank (scaling 2) -> {2 * rank}" in alpha_row[2], alpha_row  # and the guide's alpha for it
    rank_row = next(row for row in recommendations["data"] if row[0].lower().startswith("lora rank"))
    assert "set by you" in rank_row[2], rank_row


def test_a_reload_keeps_the_wizard_and_the_demo_visitors_own_runs_but_a_forged_record_owns_nothing(server):
    from gradio_client import Client

    from advisor import wizard
    from trainer import supervisor

    client, runs = server
    first = Client(client.src, verbose=False)  # one browser tab
    first.predict(model="demo", dataset="demo-sft", method="lora", max_steps=5, seq_len=64, micro_batch=4,
                  api_name="/launch")
    try:
        record = first.predict(model="demo", dataset="demo-sft", method="lora", lora_rank=12, max_steps=5, saved={},
                               api_name="/remember_after_launch")
        assert record["step"] == 4 and len(record["own"]) == 1 and record["values"]["lora_rank"] == 12, record
        assert record["furthest"] == 4  # the step bar opens steps 1 to 4 again after the reload
        (run_id,) = record["own"]
        # A reload: a new session that brings the browser's record. The values, the step and the run come back.
        again = Client(client.src, verbose=False)
        outputs = again.predict(saved=record, api_name="/restore")
        restored = dict(zip(wizard.SAVED_WIDGETS, outputs))
        assert restored["lora_rank"] == 12 and restored["model"] == "demo" and restored["max_steps"] == 5
        history, _choice, _compare = again.predict(api_name="/runs")
        assert [row[0] for row in history["data"]] == [run_id]
        # A record edited in the browser (another visitor's run named as its own) keeps its values, owns nothing.
        forged = {**record, "own": [run_id, "20261201-000000-sft-lora-0000"]}
        thief = Client(client.src, verbose=False)
        outputs = thief.predict(saved=forged, api_name="/restore")
        assert dict(zip(wizard.SAVED_WIDGETS, outputs))["lora_rank"] == 12
        history, _choice, _compare = thief.predict(api_name="/runs")
        assert history["data"] == []
        # Nothing saved (a first visit) or a record of another version: the page as it starts.
        assert again.predict(saved={"version": 0, "values": {"lora_rank": 3}}, api_name="/restore")[
            wizard.SAVED_WIDGETS.index("lora_rank")] != 3
    finally:
        supervisor.stop(run_id if "run_id" in locals() else supervisor.list_runs(runs)[0].run_id, runs_dir=runs,
                        timeout=30)


def test_the_page_shows_and_opens_the_runs_of_another_folder_such_as_a_cli_run(make_plan, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from trainer import supervisor

    elsewhere = tmp_path / "cli-runs"  # where `tunewise train` put a run, started from a shell
    run_id = supervisor.launch(make_plan({"training.max_steps": 2}), runs_dir=elsewhere)
    assert supervisor.wait(run_id, timeout=240, runs_dir=elsewhere).state == "finished"
    proc, url = start_app(tmp_path / "app-runs", log_path=tmp_path / "app.log")
    try:
        client = Client(url, verbose=False)
        history, _choice, _compare = client.predict(api_name="/runs")
        assert history["data"] == []
        history, choice, _compare = client.predict(str(elsewhere), api_name="/other_runs_dir")
        assert [row[0] for row in history["data"]] == [run_id]
        # ... and the run opens like one of the app's own: the monitor reads its events from there.
        header = next(out for out in client.predict(run_id, api_name="/watch") if isinstance(out, str) and "tw-badge" in out)
        assert run_id in header and "finished" in header, header
        # A run's own folder names its runs folder; a folder that is not there, or holds no run, is said so.
        history, _choice, _compare = client.predict(str(elsewhere / run_id), api_name="/other_runs_dir")
        assert [row[0] for row in history["data"]] == [run_id]
        for folder, said in ((tmp_path / "nowhere", "is not a folder"), (tmp_path, "holds no runs")):
            with pytest.raises(AppError) as refused:
                client.predict(str(folder), api_name="/other_runs_dir")
            assert said in str(refused.value), refused.value
    finally:
        stop_app(proc)
def test_the_data_steps_preview_shows_the_loss_tokens_and_names_rows_cut_out_of_their_loss(server):
    """The demo's chat data through the demo model's template: the assistant replies carry the loss; at a
    sequence length shorter than a row's prompt, the rows that lose all their loss are named with the fix."""
    client, _ = server
    note, shown = client.predict(dataset="demo-sft", model="demo", seq_len=512, rows=2, api_name="/preview")
    assert "**Loss on:** assistant tokens only" in note and "Every checked row has tokens that carry loss" in note
    assert shown.count("class='tw-row'") == 2 and "tw-tok tw-loss" in shown
    note, _ = client.predict(dataset="demo-sft", model="demo", seq_len=8, rows=1, api_name="/preview")
    assert "**Check this:** Rows 1, 2, 3" in note and "raise training.seq_len to" in note


def test_the_step_bar_opens_every_step_reached_and_checks_what_next_checks_on_the_way():
    """The rules of the step bar (advisor.wizard): steps up to the furthest reached stay open (Gradio's own
    stepper opens only those before the current one), the history always; forward jumps check what Next
    checks, going back checks nothing; the furthest step survives a reload, and a forged one opens no more
    than the unsigned part of a record may (step 3)."""
    from advisor import wizard

    assert wizard.open_steps(1, 1) == (1, 5)  # a fresh page: step 1 and the history
    assert wizard.open_steps(2, 4) == (1, 2, 3, 4, 5)  # back at step 2 after launching: 3 and 4 stay open
    assert wizard.open_steps(5, 2) == (1, 2, 5)  # the history does not open the steps before it
    assert wizard.furthest_step(5, 1) == 1 and wizard.furthest_step(3, 2) == 3 and wizard.furthest_step(2, 4) == 4
    assert wizard.checks_on_the_way(1, 3) == ("model", "data") and wizard.checks_on_the_way(1, 2) == ("model",)
    assert wizard.checks_on_the_way(2, 4) == ("model", "data")
    for at, target in ((3, 1), (4, 2), (3, 4), (4, 3), (1, 5), (3, 5), (5, 1)):
        assert wizard.checks_on_the_way(at, target) == (), (at, target)
    assert wizard.checks_on_the_way(5, 3) == ("model", "data")  # the model may have changed before the history

    secret = b"k" * 32
    record = wizard.session_record({"model": "demo"}, (), 2, secret, furthest=4)
    assert wizard.saved_step(record) == (2, 4)
    assert wizard.restore_session(record, secret).furthest == 4
    assert wizard.restore_session({**record, "mac": "forged"}, secret).furthest == 3
    assert wizard.saved_step({"step": "3", "furthest": 99}) == (1, 1) and wizard.saved_step(None) == (1, 1)


def test_a_step_bar_jump_forward_is_refused_as_next_is_and_going_back_checks_nothing(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server[0].src, verbose=False)
    with pytest.raises(AppError, match="unknown model 'no-such-model-xyz'"):
        client.predict(at=1, model="no-such-model-xyz", dataset="demo-sft", api_name="/step_3")
    with pytest.raises(AppError, match="data.dataset"):
        client.predict(at=2, model="demo", dataset="not-a-bundled-name", api_name="/step_4")
    # Back from the plan to step 1 with a model that cannot be read: going back is never refused.
    assert client.predict(at=3, model="no-such-model-xyz", dataset="not-a-bundled-name", api_name="/step_1") is not None
    # Forward with readable choices: the jump profiles the dataset (as Next into the plan does).
    outputs = client.predict(at=1, model="demo", dataset="demo-sft", api_name="/step_3")
    assert any(isinstance(out, dict) and any("2,000" in str(cell) for row in out.get("data", []) for cell in row)
               for out in outputs), outputs


def test_advice_shown_unchanged_is_not_called_the_users_own_when_the_plan_step_is_reached_again(server):
    """Next into the plan step re-advises keeping the user's edits; values the page shows as advised are not
    edits, including those in text boxes (an optional number such as "Evaluate every" holds "100", not 100)."""
    from gradio_client import Client

    from advisor import wizard

    client = Client(server[0].src, verbose=False)
    n = len(wizard.ADVISED_WIDGETS)
    shown = dict(zip(wizard.ADVISED_WIDGETS, client.predict(api_name="/recommend")[:n]))
    shown["lora_targets"] = shown["lora_targets"]["value"] if isinstance(shown["lora_targets"], dict) else shown["lora_targets"]
    assert isinstance(shown["eval_steps"], str) and shown["eval_steps"].strip(), shown["eval_steps"]  # a text box
    client.predict(**shown, api_name="/recommend")  # reaching the plan step again, nothing edited
    recommendations = client.predict(**shown, api_name="/estimate")[3]
    mine = [row[0] for row in recommendations["data"] if "set by you" in row[2]]
    assert mine == [], mine
