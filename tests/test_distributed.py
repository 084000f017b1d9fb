"""steer_fast on several processes.

One torchrun launch of ``distributed_worker.py`` (2 processes, gloo, CPU, about 10 s) trains
the tiny models with DDP and FSDP2 by hand and with the Trainer under DDP; the tests here check
what it reports against one process on the whole batch. FSDP1 and the Trainer's FSDP cannot run
on a CPU (FSDP1 needs an accelerator device, and accelerate enables FSDP only for one), so
their wrap decisions are checked directly: FSDP1's with torch's own policy machinery, the
Trainer's FSDP2 one in tests/test_shims_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import peft
import pytest
import torch
from torch import nn

import steer_fast
from steer_fast.distributed import (
    fsdp2_modules,
    fsdp_auto_wrap_policy,
    fsdp_unit_parameters,
    fsdp_wrap_modules,
    is_main_process,
    save_state_dict,
    shard_batch,
)
from steer_fast.injection import SteeredBlock

from tiny_models import TokenDataset, random_input_ids, tiny_causal_lm

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TIMEOUT_SECONDS = 300
TOLERANCE = 1e-5  # fp32, against one process


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    """Launch the worker on 2 processes once; (its output folder, its results)."""
    out = tmp_path_factory.mktemp("distributed")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own
        "--nproc-per-node=2",
        str(WORKER),
        str(out),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a timeout can end the launcher and both workers
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the 2-process run did not finish in {TIMEOUT_SECONDS} s:\n{output[-6000:]}")
    if process.returncode != 0:
        pytest.fail(f"the 2-process run failed ({process.returncode}):\n{output[-6000:]}")
    return out, json.loads((out / "results.json").read_text())


# ----------------------------------------------------------------------------------------------
# DDP and FSDP2 by hand, against one process
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["steer", "joint"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_take_the_steps_one_process_takes(runs, mode, kind):
    """3 AdamW steps, each process on half of every global batch: the adapters equal one
    process's on the whole batches."""
    _, results = runs
    result = results[f"{mode}-{kind}"]
    assert results["world_size"] == 2
    assert result["losses_finite"]
    assert result["adapters_moved"] > 1e-3  # the steps changed every adapter tensor
    assert result["agreement"] <= TOLERANCE, result


@pytest.mark.parametrize("kind", ["steer", "joint"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_frozen_parameters_keep_their_values_and_get_no_gradient(runs, mode, kind):
    result = runs[1][f"{mode}-{kind}"]
    assert result["frozen_count"] > 0
    assert result["frozen_unchanged"]
    assert result["frozen_without_grad"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_rank_0_writes_and_the_files_load_with_identical_logits(runs, mode):
    """Every process calls save_pretrained (FSDP2 gathers the adapters first); only rank 0
    writes, and SteerModel.from_pretrained gives the trained model's logits."""
    result = runs[1][f"save-{mode}"]
    assert result["rank_directories"] == [f"{mode}-rank0"]
    assert result["load_logits"] == 0.0


def test_fsdp2_state_dict_saved_as_the_trainer_saves_it_resumes_and_loads(runs):
    """torch.distributed.checkpoint's full state dict of a sharded SteerModel (the Trainer's FSDP2
    save) holds the adapters and the config only, resumes a new sharded model and loads with
    from_pretrained, all with identical logits."""
    result = runs[1]["save-fsdp2"]
    assert result["dcp_keys"][0] == "_extra_state"
    assert all("steer_adapter" in key for key in result["dcp_keys"][1:])
    assert len(result["dcp_keys"]) == 1 + 2 * 4  # 2 layers x (down, up) x (weight, bias)
    assert result["dcp_resume_logits"] == 0.0
    assert result["dcp_load_logits"] == 0.0


def test_sharded_joint_model_saved_with_save_state_dict_loads(runs):
    result = runs[1]["save-fsdp2-joint"]
    assert result["files"] == ["model.safetensors"]
    assert result["load_logits"] == 0.0


def test_ddp_needs_find_unused_parameters_when_an_adapter_is_off_the_loss_path(runs):
    """A loss on layer 0's output leaves layer 1's adapter without a gradient: DDP's next step
    fails without find_unused_parameters, and trains layer 0 alone with it."""
    strict, found = runs[1]["unused-strict"], runs[1]["unused-found"]
    assert strict["error"] is not None and "find_unused_parameters" in strict["error"]
    assert found["error"] is None
    assert found["moved"] and all(".layers.0." in name for name in found["moved"])


# ----------------------------------------------------------------------------------------------
# The Trainer under torchrun (DDP)
# ----------------------------------------------------------------------------------------------


def test_trainer_on_two_processes_matches_one_process(runs, tmp_path):
    """4 Trainer steps of 2 rows per process equal one process's 4 steps of 4 rows."""
    out, results = runs
    assert results["trainer-ddp"]["world_size"] == 2
    assert results["trainer-ddp"]["wrapped"] == "DistributedDataParallel"
    from transformers import Trainer

    model = worker.build_steer()
    args = worker.trainer_arguments(tmp_path, 2 * worker.TRAINER_ROWS_PER_PROCESS)
    Trainer(model=model, args=args, train_dataset=TokenDataset()).train()
    two = torch.load(out / "trainer-adapters.pt", weights_only=True)
    one = worker.adapter_tensors(model)
    assert worker.max_difference(two, one) <= TOLERANCE


def test_trainer_resumes_a_two_process_checkpoint_exactly(runs):
    out, results = runs
    assert results["trainer-ddp"]["resume_agreement"] == 0.0
    checkpoint = out / "trainer" / f"checkpoint-{worker.TRAINER_SAVE_STEPS}"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }


def test_two_process_trainer_checkpoint_loads_with_from_pretrained(runs):
    out, _ = runs
    checkpoint = out / "trainer" / f"checkpoint-{worker.TRAINER_STEPS}"
    loaded = steer_fast.SteerModel.from_pretrained(tiny_causal_lm("llama"), checkpoint)
    trained = torch.load(out / "trainer-adapters.pt", weights_only=True)
    assert worker.max_difference(worker.adapter_tensors(loaded), trained) == 0.0


def test_trl_sft_trainer_on_two_processes(runs):
    result = runs[1]["trl-sft-ddp"]
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["wrapped"] == "DistributedDataParallel"
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["changed"] and set(result["changed"]) <= set(result["adapters"])


# ----------------------------------------------------------------------------------------------
# Wrap decisions (one process)
# ----------------------------------------------------------------------------------------------


def joint(layers=None) -> steer_fast.JointModel:
    return steer_fast.get_joint_model(
        tiny_causal_lm("llama"),
        steer_fast.SteerConfig(rank=4, layers=layers),
        peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]),
    )


MODELS = {
    "llama": lambda: steer_fast.get_steer_model(tiny_causal_lm("llama")),
    "llama-layer-1": lambda: steer_fast.get_steer_model(
        tiny_causal_lm("llama"), steer_fast.SteerConfig(layers=[1])
    ),
    "llama-sites": lambda: steer_fast.get_steer_model(
        tiny_causal_lm("llama"), steer_fast.SteerConfig(site=["attn", "mlp"])
    ),
    "llama-vector": lambda: steer_fast.get_steer_model(
        tiny_causal_lm("llama"), steer_fast.SteerConfig(rank=0)
    ),
    "gpt2-plain": lambda: steer_fast.get_steer_model(tiny_causal_lm("gpt2")),
    "joint": joint,
    "joint-layer-0": lambda: joint(layers=[0]),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fsdp1_units_never_flatten_frozen_and_trainable_parameters_together(name):
    model = MODELS[name]()
    groups = fsdp_unit_parameters(model)
    parameters = dict(model.named_parameters())
    assert sorted(n for names in groups.values() for n in names) == sorted(parameters)
    for unit, names in groups.items():
        assert len({parameters[n].requires_grad for n in names}) == 1, (unit, names)
    # Each steered block's own unit holds exactly its adapters.
    blocks = [n for n, m in model.named_modules() if isinstance(m, SteeredBlock)]
    assert blocks
    for block in blocks:
        adapters = {n for n in parameters if n.startswith(f"{block}.") and "steer_adapter" in n}
        assert adapters and set(groups[block]) == adapters


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fsdp1_wraps_what_the_policy_names(name):
    """torch's FSDP1 policy machinery (what FullyShardedDataParallel runs at construction)
    wraps exactly fsdp_wrap_modules, and the decoder layers are units."""
    model = MODELS[name]()
    policy = fsdp_auto_wrap_policy(model)
    wrapped = policy._run_policy(model, set(), {})
    assert {id(m) for m in wrapped} == {id(m) for m in fsdp_wrap_modules(model)}
    layers = fsdp2_modules(model)
    assert all(id(layer) in {id(m) for m in wrapped} for layer in layers)
    assert len(layers) == 2


def test_class_based_units_would_mix_the_adapters_with_the_layer():
    """Why FSDP1 needs the policy: a unit per SteeredBlock (what a transformer-based wrap
    makes) would flatten the frozen layer with its adapters."""
    model = MODELS["llama"]()
    block = fsdp2_modules(model)[0]
    assert len({p.requires_grad for p in block.parameters()}) == 2


# ----------------------------------------------------------------------------------------------
# Bad input, one process
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "function", [fsdp_auto_wrap_policy, fsdp_wrap_modules, fsdp_unit_parameters, fsdp2_modules]
)
def test_wrap_policy_of_a_model_that_is_not_steered_is_an_error(function):
    with pytest.raises(ValueError, match="model must be a steer_fast SteerModel or JointModel"):
        function(tiny_causal_lm("llama"))


def test_wrap_policy_of_an_unloaded_model_is_an_error():
    model = MODELS["llama"]()
    model.unload()
    with pytest.raises(ValueError, match="unloaded"):
        fsdp_auto_wrap_policy(model)


def test_wrap_policy_refuses_a_layer_holding_parameters_of_its_own():
    base = tiny_causal_lm("llama")
    base.model.layers[0].gate = nn.Parameter(torch.ones(3))
    model = steer_fast.get_steer_model(base)
    with pytest.raises(ValueError, match="frozen and trainable"):
        fsdp_auto_wrap_policy(model)


def test_shard_batch_splits_rows_evenly():
    ids = random_input_ids(8, 3)
    batch = {"input_ids": ids, "labels": ids + 1}
    shards = [shard_batch(batch, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), ids)
    assert torch.equal(shards[3]["labels"], ids[6:] + 1)
    assert torch.equal(shard_batch(ids), ids)  # no process group: the whole batch


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0, "world_size": 3}, "world_size \\(3\\) must divide the global batch"),
        ({"rank": 2, "world_size": 2}, "rank must be an int in \\[0, 2\\)"),
        ({"rank": 0, "world_size": 0}, "world_size must be a positive int"),
    ],
)
def test_shard_batch_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shard_batch(random_input_ids(8, 3), **kwargs)


def test_shard_batch_rows_must_agree():
    batch = {"input_ids": random_input_ids(8, 3), "labels": random_input_ids(6, 3)}
    with pytest.raises(ValueError, match="batch: every tensor must have the same number of rows"):
        shard_batch(batch, rank=0, world_size=2)


def test_only_the_main_process_writes(tmp_path):
    model = MODELS["llama"]()
    assert is_main_process()
    model.save_pretrained(tmp_path / "other", is_main_process=False)
    save_state_dict(model, tmp_path / "other-state", is_main_process=False)
    assert not (tmp_path / "other").exists() and not (tmp_path / "other-state").exists()
    save_state_dict(model, tmp_path / "state")
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["model.safetensors"]
    loaded = steer_fast.SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "state")
    assert (
        worker.max_difference(worker.adapter_tensors(loaded), worker.adapter_tensors(model)) == 0.0
    )
