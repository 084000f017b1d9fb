"""Training a SteerModel with the tools users have: the transformers Trainer (checkpoints and
resume), gradient checkpointing, torch.compile."""

import importlib
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
from safetensors import safe_open
from transformers import Trainer, TrainingArguments

import steer_fast
from steer_fast import SteerConfig, SteerModel, get_steer_model

from tiny_models import (
    NUM_LAYERS,
    TokenDataset,
    decoder_layers,
    enable_checkpointing,
    random_input_ids,
    randomize_adapters,
    tiny_causal_lm,
)


def steered(family, **overrides):
    # Tied embeddings: a full state_dict would hold shared tensors, which safetensors refuses.
    base = tiny_causal_lm(family, tie_word_embeddings=True)
    cfg = SteerConfig(
        **{"rank": 4, "activation": "silu", "bias": True, "backend": "torch", **overrides}
    )
    return get_steer_model(base, cfg)


def training_args(output_dir, max_steps=4):
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        use_cpu=True,
        report_to=[],
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        logging_steps=100,
    )


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "_extra_state"}


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_trainer_checkpoints_hold_the_adapters_and_resume(tmp_path, family):
    torch.manual_seed(0)
    uninterrupted = steered(family)
    initial = adapter_state(uninterrupted)
    trainer = Trainer(
        model=uninterrupted, args=training_args(tmp_path / "a"), train_dataset=TokenDataset()
    )
    trainer.train()
    final = adapter_state(uninterrupted)
    assert any(not torch.equal(initial[k], final[k]) for k in final)  # it trained
    assert "eval_loss" in trainer.evaluate(TokenDataset(rows=4))  # labels are recognised

    checkpoint = tmp_path / "a" / "checkpoint-2"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        saved_config = json.loads(bytes(handle.get_tensor("_extra_state").tolist()))
    assert len(keys) == 1 + 4 * NUM_LAYERS
    assert all(".steer_adapter.default." in key for key in keys if key != "_extra_state")
    assert saved_config == uninterrupted.steer_config.to_dict()

    torch.manual_seed(1)  # another initialisation: the resume must overwrite it
    resumed = steered(family)
    Trainer(model=resumed, args=training_args(tmp_path / "b"), train_dataset=TokenDataset()).train(
        resume_from_checkpoint=str(checkpoint)
    )
    after = adapter_state(resumed)
    for key in final:
        torch.testing.assert_close(after[key], final[key], rtol=1e-6, atol=1e-7)

    # A checkpoint loads with from_pretrained too.
    loaded = SteerModel.from_pretrained(
        tiny_causal_lm(family, tie_word_embeddings=True), tmp_path / "a" / "checkpoint-4"
    )
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, uninterrupted.eval()(input_ids).logits)


def _loss_and_grads(model, input_ids):
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "family, reentrant", [("llama", False), ("llama", True), ("gpt_neox", False), ("phi3", False)]
)
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant):
    model = steered(family)
    randomize_adapters(model.get_adapters())
    model.train()
    input_ids = random_input_ids(2, 8)
    loss, grads = _loss_and_grads(model, input_ids)

    mlp_calls = []
    mlp = decoder_layers(model.base_model, family)[0].base_layer.mlp
    mlp.register_forward_hook(lambda *args: mlp_calls.append(1))
    enable_checkpointing(model, use_reentrant=reentrant)
    checkpointed_loss, checkpointed = _loss_and_grads(model, input_ids)
    assert len(mlp_calls) == 2  # forward, then the recomputation in backward
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert grads.keys() == checkpointed.keys()
    for name in grads:
        torch.testing.assert_close(checkpointed[name], grads[name], rtol=1e-6, atol=1e-7)


def test_checkpointing_every_n_layers_is_followed():
    model = steered("llama")
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip("every_n_layers arrived with activation_checkpointing_enable")
    calls = {0: 0, 1: 0}
    for index, block in enumerate(decoder_layers(model.base_model, "llama")):
        block.base_layer.mlp.register_forward_hook(
            lambda *args, index=index: calls.__setitem__(index, calls[index] + 1)
        )
    model.activation_checkpointing_enable(every_n_layers=2)
    model.train()
    _loss_and_grads(model, random_input_ids(2, 8))
    assert calls == {0: 2, 1: 1}  # layer 0 recomputed in backward, layer 1 not


def _frames(explanation):
    return [frame.filename for reason in explanation.break_reasons for frame in reason.user_stack]


# steer_fast's own files (the package and its kernels), wherever the clone lives (a venv inside a
# clone named steer_fast holds transformers' files under a path containing "steer_fast" too).
_STEER_FAST_DIRS = [Path(steer_fast.__file__).resolve().parent]
_STEER_FAST_DIRS.append(
    Path(importlib.import_module("steer_fast.kernels.launch").__file__).resolve().parent
)


def _in_steer_fast(filename: str) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(folder) for folder in _STEER_FAST_DIRS)


def _next_token_loss(logits, input_ids):
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_torch_compile_has_no_graph_break_from_steering(family):
    model = steered(family)
    randomize_adapters(model.get_adapters())
    input_ids = random_input_ids(2, 8)
    torch._dynamo.reset()
    # The forward to the logits (every steered block included) is one graph.
    explanation = torch._dynamo.explain(model)(input_ids=input_ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # With labels, transformers' loss may break the graph for its own reasons, never steer_fast.
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=input_ids, labels=input_ids)
    assert not [name for name in _frames(explanation) if _in_steer_fast(name)]

    # fullgraph compile trains like eager.
    torch._dynamo.reset()
    model.train()
    model.zero_grad()
    _next_token_loss(model(input_ids=input_ids).logits, input_ids).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.zero_grad()
    _next_token_loss(compiled(input_ids=input_ids).logits, input_ids).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
