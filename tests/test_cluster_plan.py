"""Planning over nodes x GPUs (advisor.cluster and the multi-node parts of the estimator and the plan).

Exact numbers from the parameter count: ZeRO-3 over 2 nodes x 8 GPUs shards like 16 GPUs on one
node; the traffic between nodes per step is 3 x the 16-bit parameter bytes (the ZeRO paper's 3 Psi)
times the ring factor 15/16; host RAM per node; the slow-interconnect warning fires at cloud
Ethernet and not at InfiniBand speeds; the cheapest fix proposes nodes and says how many; the plan
and `tunewise plan` refuse a node with more GPUs than it holds, and nodes < 1. No torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from advisor import cluster, gpus, memory, specs
from advisor.errors import TunewiseError
from advisor.plan import Plan, PlanError

REPO = Path(__file__).resolve().parent.parent
LLAMA_7B = "meta-llama/Llama-2-7b-hf"
PARAMS_7B = 6_738_415_616


def tunewise(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def spec():
    found = specs.resolve_model(LLAMA_7B)
    assert specs.param_counts(found).total == PARAMS_7B
    return found


FULL_ZERO3 = memory.TrainingSetup(method="full", precision="amp", micro_batch=1, seq_len=512, shard="zero3")


def test_zero3_shards_over_every_gpu_of_every_node(spec):
    two_by_eight = memory.estimate(spec, FULL_ZERO3.with_(num_gpus=8, num_nodes=2))
    assert two_by_eight.components == memory.estimate(spec, FULL_ZERO3.with_(num_gpus=16)).components
    # 16-bit weights and gradients on the GPU, fp32 masters + two AdamW moments (12 B) in the optimizer, / 16.
    assert two_by_eight.components["weights"] == -(-2 * PARAMS_7B // 16)
    assert two_by_eight.components["gradients"] == -(-2 * PARAMS_7B // 16)
    assert two_by_eight.components["optimizer"] == -(-12 * PARAMS_7B // 16)
    assert "/ 16 GPUs (2 nodes x 8)" in two_by_eight.explanations["weights"]
    one_node = memory.estimate(spec, FULL_ZERO3.with_(num_gpus=8))
    assert one_node.components["optimizer"] == -(-12 * PARAMS_7B // 8)


def test_memory_per_gpu_for_each_strategy_and_host_ram(spec):
    setup = FULL_ZERO3.with_(num_gpus=8, num_nodes=2)
    found = cluster.cluster_estimate(spec, setup)
    assert set(found.per_gpu_bytes) == {"none", "zero2", "zero3"}
    assert found.per_gpu_bytes["none"] > found.per_gpu_bytes["zero2"] > found.per_gpu_bytes["zero3"]
    assert found.per_gpu_bytes["zero3"] == memory.estimate(spec, setup).total_bytes
    # FSDP loads the 16-bit weights on one process per node; each of the 8 processes takes 2 GB.
    assert found.host_bytes_per_node == 8 * cluster.PROCESS_HOST_BYTES + 2 * PARAMS_7B
    ddp_host, how = cluster.host_memory(spec, setup.with_(shard="none"))
    assert ddp_host == 8 * cluster.PROCESS_HOST_BYTES + 8 * 2 * PARAMS_7B and "8 copies" in how
    # With CPU offload the optimizer state of the node's 8 GPUs lives in its RAM (more than loading takes).
    offload = setup.with_(cpu_offload=True)
    on_gpu = memory.estimate(spec, setup)
    host, how = cluster.host_memory(spec, offload)
    moved = 8 * (on_gpu.components["optimizer"] + on_gpu.components["weights"])
    assert host == 8 * cluster.PROCESS_HOST_BYTES + moved and "offloaded" in how


def test_traffic_between_nodes_is_three_times_the_16_bit_parameters_for_zero3(spec):
    ring = 15 / 16  # NCCL's ring over 16 GPUs: each link carries (W - 1) / W of the volume
    setup = FULL_ZERO3.with_(num_gpus=8, num_nodes=2)
    zero3 = cluster.network_traffic(spec, setup)
    assert zero3.bytes_per_step == int(3 * 2 * PARAMS_7B * ring)
    assert zero3.seconds_per_step == pytest.approx(zero3.bytes_per_step * 8 / 100e9)  # at 100 Gb/s
    assert "in forward and again in backward" in zero3.explanation
    # DDP all-reduces the fp32 gradients of mixed precision: 2 x 4 B per parameter; ZeRO-2 2 x 2 B.
    assert cluster.network_traffic(spec, setup.with_(shard="none")).bytes_per_step == int(2 * 4 * PARAMS_7B * ring)
    assert cluster.network_traffic(spec, setup.with_(shard="zero2")).bytes_per_step == int(2 * 2 * PARAMS_7B * ring)
    # FSDP gathers at every micro-batch; DDP syncs once per optimizer step.
    assert cluster.network_traffic(spec, setup.with_(grad_accum=4)).bytes_per_step == int(4 * 3 * 2 * PARAMS_7B * ring)
    ddp4 = cluster.network_traffic(spec, setup.with_(shard="none", grad_accum=4))
    assert ddp4.bytes_per_step == int(2 * 4 * PARAMS_7B * ring)
    # LoRA: the frozen base is still gathered twice; only the adapters' gradients are reduced.
    lora = setup.with_(method="lora", precision="bf16")
    adapters = memory.estimate(spec, lora).trainable_params
    assert 0 < adapters < PARAMS_7B / 100
    assert cluster.network_traffic(spec, lora).bytes_per_step == int((2 * 2 * PARAMS_7B + 2 * adapters) * ring)
    # One node: nothing crosses a network.
    assert cluster.network_traffic(spec, FULL_ZERO3.with_(num_gpus=8)).bytes_per_step == 0


def test_a_slow_interconnect_is_warned_about_and_a_fast_one_is_not(spec):
    h100 = gpus.get_gpu("H100-80GB").dense_tflops
    assert h100 == 989
    small_steps = FULL_ZERO3.with_(num_gpus=8, num_nodes=2)
    slow = cluster.cluster_estimate(spec, small_steps, 100, h100)
    (warning,) = slow.warnings
    traffic = slow.traffic["zero3"]
    # 6 x params x 512 tokens of compute at 40% of 989 TFLOPS, against 37.9 GB at 12.5 GB/s.
    assert traffic.compute_seconds_per_step == pytest.approx(6 * PARAMS_7B * 512 / (989e12 * cluster.MFU))
    assert traffic.seconds_per_step > traffic.compute_seconds_per_step
    assert warning.startswith("slow interconnect") and "100 Gb/s" in warning
    assert f"{traffic.needed_gbps:,.0f} Gb/s" in warning
    assert traffic.needed_gbps == pytest.approx(traffic.bytes_per_step * 8 / traffic.compute_seconds_per_step / 1e9)
    # Long sequences and a big micro-batch over 8 x 400 Gb InfiniBand: the compute hides the transfers.
    big_steps = small_steps.with_(micro_batch=16, seq_len=2048, gradient_checkpointing=True)
    fast = cluster.cluster_estimate(spec, big_steps, 3200, h100)
    assert fast.warnings == ()
    assert fast.traffic["zero3"].seconds_per_step < fast.traffic["zero3"].compute_seconds_per_step
    # The same layout on one node: no network, no warning.
    assert cluster.cluster_estimate(spec, FULL_ZERO3.with_(num_gpus=8), 10, h100).warnings == ()


def test_the_cheapest_fix_proposes_more_nodes_and_says_how_many():
    spec = specs.resolve_model("meta-llama/Llama-2-70b-hf")
    ppo = memory.TrainingSetup(method="lora", precision="bf16", micro_batch=1, seq_len=512, stage="ppo")
    fit = memory.gpu_fit(spec, ppo, int(gpus.get_gpu("A100-40GB").memory_bytes))
    assert not fit.fits
    assert "over 2 nodes x 8 GPUs of this size (16 GPUs" in fit.cheapest_fix
    assert (fit.fixed_setup.num_nodes, fit.fixed_setup.num_gpus, fit.fixed_setup.shard) == (2, 8, "zero3")
    assert memory.estimate(spec, fit.fixed_setup).total_bytes <= gpus.get_gpu("A100-40GB").memory_bytes
    # One node of 8 is not enough (the search would have stopped there).
    one_node = fit.fixed_setup.with_(num_nodes=1)
    assert memory.estimate(spec, one_node).total_bytes > gpus.get_gpu("A100-40GB").memory_bytes


def test_the_plan_refuses_a_node_with_more_gpus_than_it_holds():
    with pytest.raises(PlanError, match="hardware.num_nodes: must be a whole number of machines"):
        Plan.from_dict({"hardware": {"num_nodes": 0}})
    with pytest.raises(PlanError) as too_many:
        Plan.from_dict({"hardware": {"gpu": "A100-80GB", "num_nodes": 2, "num_gpus": 12}})
    assert too_many.value.field == "hardware.num_gpus"
    assert "the 8 A100-80GB GPUs a node holds" in str(too_many.value) and "3 nodes x 8 GPUs" in str(too_many.value)
    with pytest.raises(PlanError, match="the 16 GPUs the largest nodes hold"):
        Plan.from_dict({"hardware": {"num_nodes": 2, "num_gpus": 17}})
    # The A100-40GB comes 16 to a node (a2-megagpu-16g); one node keeps its old meaning (all the GPUs).
    assert Plan.from_dict({"hardware": {"gpu": "A100-40GB", "num_nodes": 4, "num_gpus": 16}}).hardware.num_gpus == 16
    assert Plan.from_dict({"hardware": {"num_gpus": 64}}).hardware.num_nodes == 1
    plan = Plan.from_dict({"hardware": {"gpu": "H100-80GB", "num_nodes": 4, "num_gpus": 8, "shard": "zero3"}})
    assert Plan.from_yaml(plan.to_yaml()) == plan
    assert memory.setup_from_plan(plan).world_size == 32


def test_tunewise_plan_over_nodes_prints_the_cluster_figures():
    result = tunewise("plan", "--model", "llama-2-7b", "--method", "full", "--precision", "amp", "--micro-batch", "1",
                      "--nodes", "2", "--gpus-per-node", "8", "--shard", "zero3", "--gpu", "H100-80GB", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["setup"]["num_nodes"], report["setup"]["num_gpus"]) == (2, 8)
    (entry,) = report["estimates"]
    found = entry["cluster"]
    assert found["world_size"] == 16
    assert found["traffic"]["zero3"]["bytes_per_step"] == int(3 * 2 * PARAMS_7B * 15 / 16)
    assert found["per_gpu_bytes"]["zero3"] == entry["total_bytes"]
    assert found["host_bytes_per_node"] == 8 * cluster.PROCESS_HOST_BYTES + 2 * PARAMS_7B
    assert found["warnings"] and found["warnings"][0].startswith("slow interconnect")
    text = tunewise("plan", "--model", "llama-2-7b", "--method", "full", "--precision", "amp", "--micro-batch", "1",
                    "--nodes", "2", "--gpus-per-node", "8", "--shard", "zero3", "--gpu", "H100-80GB",
                    "--interconnect-gbps", "3200")
    assert text.returncode == 0, text.stderr
    assert "over 2 nodes x 8 GPUs = 16 GPUs (network between nodes: 3200 Gb/s per node)" in text.stdout
    assert "between nodes per step (zero3)" in text.stdout and "ZeRO-3 / FSDP FULL_SHARD" in text.stdout
    assert "host RAM per node" in text.stdout


@pytest.mark.parametrize("args, message", [
    (("--nodes", "0"), "--nodes must be at least 1 (a machine), got 0"),
    (("--nodes", "2", "--gpus-per-node", "9", "--gpu", "H100-80GB"), "9 GPUs per node is more than the 8 H100-80GB"),
    (("--nodes", "2", "--gpus-per-node", "17"), "17 GPUs per node is more than the 16 GPUs the largest nodes hold"),
    (("--gpus", "2", "--gpus-per-node", "2"), "--gpus and --gpus-per-node both given"),
    (("--nodes", "2", "--interconnect-gbps", "0"), "interconnect_gbps: must be a positive number"),
])
def test_tunewise_plan_refuses_bad_layouts_clearly(args, message):
    result = tunewise("plan", "--model", "llama-2-7b", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_interconnect_must_be_positive(spec):
    with pytest.raises(TunewiseError, match="interconnect_gbps"):
        cluster.cluster_estimate(spec, FULL_ZERO3.with_(num_gpus=8, num_nodes=2), -5)


def test_the_advisor_sizes_the_plan_for_every_gpu_of_every_node():
    from advisor.recommend import AdvisorInputs, recommend

    inputs = dict(model="meta-llama/Llama-2-70b-hf", examples=20_000, task="instruction", gpu="A100-80GB", stage="ppo")
    one_node = recommend(AdvisorInputs(**inputs, num_gpus=8))
    two_nodes = recommend(AdvisorInputs(**inputs, num_gpus=8, num_nodes=2))
    assert "2 nodes x 8 x A100-80GB" in two_nodes.memory.gpu and two_nodes.fits
    assert two_nodes.memory.total_bytes < one_node.memory.total_bytes  # the shards are split 16 ways, not 8
    plan = two_nodes.to_plan()
    assert (plan.hardware.num_nodes, plan.hardware.num_gpus, plan.hardware.shard) == (2, 8, "zero3")
    with pytest.raises(TunewiseError, match="num_nodes"):
        AdvisorInputs(**inputs, num_nodes=0)
