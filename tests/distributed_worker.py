"""Trains tiny steered models on 2 processes (gloo, CPU) for tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc-per-node=2 \
        tests/distributed_worker.py OUT

Every process runs the same scenarios; rank 0 writes what the tests check to OUT/results.json
(and the saved adapters under OUT). Scenarios: DDP and FSDP2 by hand (3 AdamW steps on half of
each global batch, against one process on the whole batch, computed here on each rank without
collectives), FSDP2 saved the way the Trainer saves it (torch.distributed.checkpoint's full state
dict) and loaded back, DDP's unused-parameter check, the Trainer under DDP (a run saving at
step 2, and a second run resuming from that checkpoint), and TRL's SFTTrainer under DDP.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

# As tests/conftest.py does: the Triton interpreter when there is no GPU, set before import.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peft  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import steer_fast  # noqa: E402
from steer_fast.distributed import fsdp2_modules, save_state_dict, shard_batch  # noqa: E402

from tiny_models import (  # noqa: E402
    TokenDataset,
    random_input_ids,
    randomize_adapters,
    tiny_causal_lm,
)

LEARNING_RATE = 1e-2
GLOBAL_ROWS, LENGTH = 8, 6
# Three different global batches, one per optimizer step.
BATCHES = [random_input_ids(GLOBAL_ROWS, LENGTH, seed=seed) for seed in (5, 6, 7)]
PROBE = random_input_ids(3, 7, seed=9)
# The Trainer runs: 4 steps of 2 rows per process (4 rows a step), checkpoints every 2 steps.
TRAINER_STEPS, TRAINER_ROWS_PER_PROCESS, TRAINER_SAVE_STEPS = 4, 2, 2


def build_steer() -> steer_fast.SteerModel:
    """The tiny steered Llama every scenario trains: rank 4, biases, random adapter weights (so
    that every adapter tensor gets a gradient from the first step)."""
    model = steer_fast.get_steer_model(
        tiny_causal_lm("llama"), steer_fast.SteerConfig(rank=4, bias=True)
    )
    randomize_adapters(model.get_adapters(), seed=3, std=0.1)
    return model.train()


def build_joint() -> steer_fast.JointModel:
    """A tiny JointModel: LoRA r=2 on q_proj and down_proj, rank-4 steering, random weights."""
    model = steer_fast.get_joint_model(
        tiny_causal_lm("llama"),
        steer_fast.SteerConfig(rank=4),
        peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]),
    )
    randomize_adapters(model.get_adapters(), seed=3, std=0.1)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, parameter in model.lora_named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.train()


def trainer_arguments(output_dir: Path, rows_per_process: int):
    """The Trainer settings of the DDP runs (and of the one-process run they are compared with:
    ``rows_per_process`` = the global batch there)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=TRAINER_STEPS,
        per_device_train_batch_size=rows_per_process,
        learning_rate=LEARNING_RATE,
        train_sampling_strategy="sequential",
        save_strategy="steps",
        save_steps=TRAINER_SAVE_STEPS,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        seed=0,
    )


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Every adapter parameter (steering and LoRA) by name, whole (FSDP2 shards gathered)."""
    names = model._adapter_parameter_names()
    return {
        name: _whole(parameter).detach().clone()
        for name, parameter in model.named_parameters()
        if name in names
    }


def frozen_tensors(model) -> dict[str, torch.Tensor]:
    names = model._adapter_parameter_names()
    return {
        name: _whole(parameter).detach().clone()
        for name, parameter in model.named_parameters()
        if name not in names
    }


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def train(module: torch.nn.Module, batches: list[torch.Tensor], parameters) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=LEARNING_RATE)
    losses = []
    for ids in batches:
        loss = module(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys(), (sorted(first), sorted(second))
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.detach().clone()


def check_frozen(model, before: dict[str, torch.Tensor]) -> dict:
    """Whether every frozen parameter kept its value and has no gradient."""
    names = model._adapter_parameter_names()
    frozen = [(n, p) for n, p in model.named_parameters() if n not in names]
    return {
        "frozen_unchanged": max_difference(frozen_tensors(model), before) == 0.0,
        "frozen_without_grad": all(p.grad is None and not p.requires_grad for _, p in frozen),
        "frozen_count": len(frozen),
    }


def one_process(builder) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The reference: one process, the whole global batch each step (no collectives)."""
    model = builder()
    losses = train(model, BATCHES, model.parameters())
    return adapter_tensors(model), losses


def distribute(model, mode: str) -> torch.nn.Module:
    """``model`` under DDP, or sharded by FSDP2 per decoder layer (the module to call)."""
    if mode == "ddp":
        return DistributedDataParallel(model)
    for layer in fsdp2_modules(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def by_hand(builder, mode: str, reference: dict[str, torch.Tensor]) -> dict:
    """DDP or FSDP2 by hand: each process trains on its half of every global batch."""
    model = builder()
    before = frozen_tensors(model)
    initial = adapter_tensors(model)
    module = distribute(model, mode)
    losses = train(module, [shard_batch(ids) for ids in BATCHES], model.parameters())
    trained = adapter_tensors(model)
    result = {
        "agreement": max_difference(trained, reference),
        "adapters_moved": min((trained[k] - initial[k]).abs().max().item() for k in trained),
        "losses_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        **check_frozen(model, before),
    }
    return result


def save_and_load_steer(model, mode: str, out: Path, result: dict) -> None:
    """Every process calls save_pretrained; only rank 0 writes. Rank 0 loads the files into a
    new model; its logits are compared with the trained model's."""
    rank = dist.get_rank()
    directory = out / f"{mode}-steer"
    model.save_pretrained(directory)
    model.save_pretrained(out / f"{mode}-rank{rank}")
    dist.barrier()
    if rank == 0:
        loaded = steer_fast.SteerModel.from_pretrained(tiny_causal_lm("llama"), directory)
        result["load_logits"] = max_difference(
            {"logits": logits(loaded)}, {"logits": result["logits"]}
        )
        result["rank_directories"] = sorted(p.name for p in out.glob(f"{mode}-rank*"))


def dcp_round_trip(model, out: Path, result: dict, loader) -> None:
    """FSDP2's full state dict as the Trainer saves it (accelerate: get_model_state_dict with
    full_state_dict, broadcast_from_rank0, cpu_offload), written by rank 0 as model.safetensors;
    loaded back into a new sharded model (as the Trainer resumes) and by ``loader`` from the
    checkpoint directory (as a user loads it)."""
    from safetensors.torch import save_file

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    directory = out / f"dcp-{type(model).__name__}"
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        result["dcp_keys"] = sorted(state)
    dist.barrier()
    resumed = build_steer() if loader is steer_fast.SteerModel else build_joint()
    for layer in fsdp2_modules(resumed):
        fully_shard(layer)
    fully_shard(resumed)
    set_model_state_dict(resumed, state if dist.get_rank() == 0 else {}, options=options)
    result["dcp_resume_logits"] = max_difference(
        {"logits": logits(resumed)}, {"logits": result["logits"]}
    )
    if dist.get_rank() == 0:
        loaded = loader.from_pretrained(tiny_causal_lm("llama"), directory)
        result["dcp_load_logits"] = max_difference(
            {"logits": logits(loaded)}, {"logits": result["logits"]}
        )


def save_joint_sharded(out: Path) -> dict:
    """A JointModel sharded by FSDP2, saved with save_state_dict (every process calls it, rank
    0 writes) and loaded by rank 0 with JointModel.from_pretrained."""
    model = build_joint()
    train(distribute(model, "fsdp2"), [shard_batch(ids) for ids in BATCHES], model.parameters())
    trained = logits(model)
    directory = out / "fsdp2-joint-state"
    save_state_dict(model, directory)
    dist.barrier()
    if dist.get_rank() != 0:
        return {}
    loaded = steer_fast.JointModel.from_pretrained(tiny_causal_lm("llama"), directory)
    return {
        "load_logits": max_difference({"logits": logits(loaded)}, {"logits": trained}),
        "files": sorted(p.name for p in directory.iterdir()),
    }


def unused_parameters(find_unused: bool) -> dict:
    """A loss on layer 0's output leaves layer 1's adapter out of the graph: DDP's second step
    fails unless find_unused_parameters is set."""
    model = build_steer()
    before = adapter_tensors(model)
    module = DistributedDataParallel(model, find_unused_parameters=find_unused)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1, weight_decay=0.0)
    try:
        for ids in BATCHES[:2]:
            hidden = module(input_ids=shard_batch(ids), output_hidden_states=True).hidden_states
            hidden[1].pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    except RuntimeError as error:
        return {"error": str(error)}
    after = adapter_tensors(model)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    return {"error": None, "moved": sorted(moved)}


def trainer_ddp(out: Path) -> dict:
    """The Trainer under DDP: a 4-step run checkpointing at steps 2 and 4, and a run resumed
    from checkpoint-2."""
    from transformers import Trainer

    model = build_steer()
    trainer = Trainer(
        model=model,
        args=trainer_arguments(out / "trainer", TRAINER_ROWS_PER_PROCESS),
        train_dataset=TokenDataset(),
    )
    history = trainer.train()
    full_run = adapter_tensors(model)
    resumed_model = build_steer()
    resumed = Trainer(
        model=resumed_model,
        args=trainer_arguments(out / "trainer-resumed", TRAINER_ROWS_PER_PROCESS),
        train_dataset=TokenDataset(),
    )
    resumed.train(resume_from_checkpoint=str(out / "trainer" / f"checkpoint-{TRAINER_SAVE_STEPS}"))
    if dist.get_rank() == 0:
        torch.save(full_run, out / "trainer-adapters.pt")
    return {
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "loss": history.training_loss,
        "resume_agreement": max_difference(adapter_tensors(resumed_model), full_run),
    }


def trl_sft_ddp(out: Path) -> dict:
    """TRL's SFTTrainer on the 2 processes (DDP): 2 steps of a SteerModel."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return {"skipped": "trl is not installed"}
    import datasets
    import trl
    from test_trl import tiny_tokenizer, words

    model = build_steer()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(
            output_dir=str(out / "sft"),
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=LEARNING_RATE,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            ddp_find_unused_parameters=False,
        ),
        train_dataset=datasets.Dataset.from_dict({"text": words(seed=1, rows=8, length=7)}),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    changed = {
        name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])
    }
    return {
        "wrapped": type(trainer.model_wrapped).__name__,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "changed": sorted(changed),
        "adapters": sorted(model._adapter_parameter_names()),
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    results: dict = {"world_size": dist.get_world_size()}
    for name, builder in (("steer", build_steer), ("joint", build_joint)):
        reference, losses = one_process(builder)
        results[f"reference-{name}"] = {"losses": losses}
        for mode in ("ddp", "fsdp2"):
            results[f"{mode}-{name}"] = by_hand(builder, mode, reference)
    for mode in ("ddp", "fsdp2"):
        model = build_steer()
        train(distribute(model, mode), [shard_batch(ids) for ids in BATCHES], model.parameters())
        result = {"logits": logits(model)}
        save_and_load_steer(model, mode, out, result)
        if mode == "fsdp2":
            dcp_round_trip(model, out, result, steer_fast.SteerModel)
        del result["logits"]
        results[f"save-{mode}"] = result
    results["save-fsdp2-joint"] = save_joint_sharded(out)
    results["unused-strict"] = unused_parameters(find_unused=False)
    results["unused-found"] = unused_parameters(find_unused=True)
    results["trainer-ddp"] = trainer_ddp(out)
    results["trl-sft-ddp"] = trl_sft_ddp(out)
    dist.barrier()
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
