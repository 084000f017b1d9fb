"""Steering a bitsandbytes-quantized base model (QLoRA's setting), on bitsandbytes' CPU kernels:
PEFT's parameter counts, the fused path and a new adapter's exactness on 4-bit (nf4) and 8-bit
layers, training with gradient checkpointing (the gradient reaching earlier adapters through the
quantized layers), PEFT's prepare_model_for_kbit_training, save and load onto a fresh quantized
base, the joint model with PEFT's 4-bit LoRA layers, and mixed batches."""

import peft
import pytest
import torch

from steer_fast import JointModel, SteerConfig, SteerModel, get_joint_model, get_steer_model

from tiny_models import quantized_causal_lm, random_input_ids, save_tiny_causal_lm

pytest.importorskip("bitsandbytes")

INPUT_IDS = random_input_ids(3, 6)
CONFIG = SteerConfig(rank=4, backend="torch")
# 2 layers x (down 4 x 64 + up 64 x 4)
ADAPTER_PARAMETERS = 2 * 2 * 4 * 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory of the saved tiny Llama, its parameter count unquantized)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = save_tiny_causal_lm("llama", directory)
    return directory, sum(p.numel() for p in model.parameters())


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, **kwargs).logits


def randomize(model, adapter_name="default", seed=0, std=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model._adapter_modules(adapter_name):
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def loss_and_grads(model):
    model.zero_grad()
    loss = model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


def train(model, steps=6, lr=3e-2):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("bits", [4, 8])
def test_parameters_are_counted_as_peft_counts_them(saved, bits, capsys):
    directory, base_count = saved
    model = get_steer_model(quantized_causal_lm(directory, bits), CONFIG)
    expected = (ADAPTER_PARAMETERS, base_count + ADAPTER_PARAMETERS)
    assert model.get_nb_trainable_parameters() == expected
    logits(model)  # bitsandbytes repacks 4-bit weights for the CPU on the first forward
    assert model.get_nb_trainable_parameters() == expected
    model.print_trainable_parameters()
    assert f"all params: {base_count + ADAPTER_PARAMETERS:,d}" in capsys.readouterr().out
    # PEFT counts the same base the same way.
    lora = peft.get_peft_model(
        quantized_causal_lm(directory, bits), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    trainable, total = lora.get_nb_trainable_parameters()
    assert total - trainable == base_count


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_layers_take_the_fused_path_exactly(saved, bits):
    directory, _ = saved
    base = quantized_causal_lm(directory, bits)
    expected = logits(base)
    model = get_steer_model(base, CONFIG)
    assert set(model.steering_paths().values()) == {"fused"}
    assert "fused" in model.steering_report()
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)  # a new adapter
    randomize(model)
    steered = logits(model)
    assert not torch.allclose(steered, expected, atol=1e-3)
    # The fused path on quantized layers equals the layer run as it is, then steered.
    plain = get_steer_model(
        quantized_causal_lm(directory, bits),
        SteerConfig(rank=4, backend="torch", fuse_residual=False),
    )
    assert set(plain.steering_paths().values()) == {"plain"}
    plain.load_steering_tensors(model.steering_tensors())
    torch.testing.assert_close(logits(plain), steered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_gradients(saved, reentrant):
    directory, _ = saved
    model = get_steer_model(quantized_causal_lm(directory), CONFIG)
    randomize(model, std=0.1)
    model.train()
    loss, grads = loss_and_grads(model)
    # Layer 0's adapter is reached only through layer 1's quantized attention and MLP.
    layer0 = [name for name in grads if ".layers.0." in name]
    assert layer0 and all(grads[name].abs().sum() > 0 for name in layer0)
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    checkpointed_loss, checkpointed = loss_and_grads(model)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert checkpointed.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(checkpointed[name], grads[name], rtol=1e-5, atol=1e-6)
    losses = train(model)
    assert losses[-1] < losses[0]


def test_peft_prepare_model_for_kbit_training_then_steering_trains(saved):
    directory, _ = saved
    base = peft.prepare_model_for_kbit_training(quantized_causal_lm(directory))
    model = get_steer_model(base, CONFIG)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("steer_adapter" in name for name in trainable)
    assert all(
        block.base_layer.gradient_checkpointing for block in model._steered_blocks().values()
    )
    losses = train(model)
    assert losses[-1] < losses[0]


def test_save_and_load_onto_a_fresh_4bit_base(saved, tmp_path):
    directory, _ = saved
    model = get_steer_model(quantized_causal_lm(directory), CONFIG)
    model.add_adapter("vector", SteerConfig(rank=0, layers=[1], backend="torch"))
    randomize(model)
    randomize(model, "vector", seed=1)
    model.save_pretrained(tmp_path / "steering")
    expected = {name: logits(model, adapter_names=[name] * 3) for name in model.list_adapters()}

    loaded = SteerModel.from_pretrained(quantized_causal_lm(directory), tmp_path / "steering")
    loaded.load_adapter(tmp_path / "steering" / "vector", "vector")
    for name, values in expected.items():
        torch.testing.assert_close(logits(loaded, adapter_names=[name] * 3), values, rtol=0, atol=0)


def test_the_joint_model_puts_peft_4bit_lora_and_steering_on_a_4bit_base(saved, tmp_path):
    directory, base_count = saved
    lora_config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_joint_model(quantized_causal_lm(directory), CONFIG, lora_config)
    layers = model.get_base_model().model.layers
    assert type(layers[0].base_layer.self_attn.o_proj).__name__ == "Linear4bit"
    assert type(layers[0].base_layer.self_attn.o_proj).__module__ == "peft.tuners.lora.bnb"
    trainable, total = model.get_nb_trainable_parameters()
    assert total == base_count + trainable
    losses = train(model)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "joint")
    loaded = JointModel.from_pretrained(quantized_causal_lm(directory), tmp_path / "joint")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_mixed_batches_on_a_quantized_base(saved, bits):
    directory, _ = saved
    base_logits = logits(quantized_causal_lm(directory, bits))
    model = get_steer_model(quantized_causal_lm(directory, bits), CONFIG)
    model.add_adapter("vector", SteerConfig(rank=0, backend="torch"))
    randomize(model)
    randomize(model, "vector", seed=1)
    mixed = logits(model, adapter_names=["vector", "__base__", "default"])
    alone = {}
    for name in ("vector", "default"):
        model.set_adapter(name)
        alone[name] = logits(model)
    torch.testing.assert_close(mixed[0], alone["vector"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base_logits[1], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2], alone["default"][2], rtol=1e-5, atol=1e-5)
