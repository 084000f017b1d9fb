"""TRL's SFTTrainer and GRPOTrainer train a SteerModel and a JointModel as they are: a few steps
on a tiny model with a local word-level tokenizer, finite losses, only adapter parameters
changed, generation inside GRPO through the steered blocks, and checkpoints that
``from_pretrained`` loads."""

from __future__ import annotations

import peft
import pytest
import torch

import steer_fast
from steer_fast.injection import SteeredBlock

from tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE, tiny_causal_lm

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

FIRST_WORD = 4  # token ids 0-3: pad, bos, eos, unk


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: "w4" ... "w127" are ids 4 to
    127, separated by spaces (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {"<pad>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID, "<unk>": 3}
    vocab = {**special, **{f"w{i}": i for i in range(FIRST_WORD, VOCAB_SIZE)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def words(seed: int, rows: int, length: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD, VOCAB_SIZE, (rows, length), generator=generator)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def build(kind: str):
    if kind == "steer":
        return steer_fast.get_steer_model(tiny_causal_lm("llama"), steer_fast.SteerConfig(rank=4))
    return steer_fast.get_joint_model(
        tiny_causal_lm("llama"),
        steer_fast.SteerConfig(rank=4),
        peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]),
    )


def loader(kind: str):
    return steer_fast.SteerModel if kind == "steer" else steer_fast.JointModel


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_trained(model, before: dict[str, torch.Tensor], trainer) -> None:
    """Finite losses; every adapter tensor that trains changed, nothing else did."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)).tolist()), losses
    adapters = model._adapter_parameter_names()
    changed = {
        name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])
    }
    assert changed <= adapters, sorted(changed - adapters)
    steering = {name for name in adapters if "steer_adapter" in name}
    assert any(name in changed for name in steering), "no steering parameter trained"
    if len(adapters) > len(steering):
        assert changed - steering, "no LoRA parameter trained"


def check_checkpoint(model, kind: str, directory) -> None:
    """The Trainer checkpoint loads with from_pretrained into a fresh base model and holds the
    trained adapters."""
    loaded = loader(kind).from_pretrained(tiny_causal_lm("llama"), directory)
    trained = dict(model.named_parameters())
    for name, parameter in loaded.named_parameters():
        if name in loaded._adapter_parameter_names():
            torch.testing.assert_close(parameter, trained[name], rtol=0, atol=0)


def common_settings(tmp_path, steps: int) -> dict:
    return dict(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=steps,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


@pytest.mark.parametrize("kind", ["steer", "joint"])
def test_sft_trainer_trains_the_adapters_only(kind, tmp_path):
    """SFTTrainer's defaults (bf16 autocast, gradient checkpointing, its fused LM head)."""
    model = build(kind)
    before = snapshot(model)
    data = datasets.Dataset.from_dict({"text": words(seed=1, rows=12, length=7)})
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(per_device_train_batch_size=4, **common_settings(tmp_path, 3)),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    check_trained(model, before, trainer)
    check_checkpoint(model, kind, tmp_path / "out" / "checkpoint-3")


@pytest.mark.parametrize("kind", ["steer", "joint"])
def test_grpo_trainer_generates_with_steering_and_trains_the_adapters_only(kind, tmp_path):
    model = build(kind)
    before = snapshot(model)
    decoding = []  # (layer, steering on) for every steered block run on one new token

    def record(block, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            decoding.append((block.layer_index, block.steering_enabled))

    blocks = [m for m in model.modules() if isinstance(m, SteeredBlock)]
    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]

    def reward(completions, **kwargs):
        """Toy reward: how often the completion says "w7", and a little for its length."""
        return [c.split().count("w7") + 0.1 * len(c.split()) for c in completions]

    data = datasets.Dataset.from_dict({"prompt": words(seed=2, rows=8, length=3)})
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=trl.GRPOConfig(
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=4,
            bf16=False,
            **common_settings(tmp_path, 2),
        ),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
    )
    try:
        trainer.train()
    finally:
        for handle in handles:
            handle.remove()
    assert decoding, "no new token was generated through the steered blocks"
    assert {index for index, _ in decoding} == {b.layer_index for b in blocks}
    assert all(enabled for _, enabled in decoding)
    check_trained(model, before, trainer)
    check_checkpoint(model, kind, tmp_path / "out" / "checkpoint-2")
