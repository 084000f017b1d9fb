"""The behaviour of transformers, PEFT and the Trainer that steer_fast.shims relies on, checked
against the installed versions: each test fails when what a shim assumes stops being true."""

import peft
import pytest
import torch
import transformers
from torch import nn

from steer_fast.shims import (
    BNB_4BIT_PARAMETER_CLASS,
    FORWARD_HOOK_DICTS,
    MIN_TRANSFORMERS_MAJOR_FOR_FUSING,
    PEFT_MODEL_PREFIX,
    checkpointed_call,
    checkpointing_active,
    layer_forward_function,
    lora_b_weight,
    parameter_count,
    peft_adapter_layers_enabled,
    share_forward_hooks,
    trainer_accumulation_steps,
    trainer_loss_is_scaled,
    transformers_major,
)

from tiny_models import (
    TokenDataset,
    capture_layer_calls,
    decoder_layers,
    enable_checkpointing,
    quantized_causal_lm,
    random_input_ids,
    save_tiny_causal_lm,
    tiny_causal_lm,
)

INPUT_IDS = random_input_ids(2, 6)


def counting(function, counter):
    def counted(*args, **kwargs):
        counter.append(1)
        return function(*args, **kwargs)

    return counted


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_forward_function_is_the_class_forward_outside_checkpointing(family):
    model = tiny_causal_lm(family)
    calls = capture_layer_calls(model, family, INPUT_IDS)
    enable_checkpointing(model)
    model.train()
    layer = decoder_layers(model, family)[0]
    forward = layer_forward_function(layer)
    # check_fused_layer compares this name with the class's own forward.
    assert forward.__qualname__ == f"{type(layer).__qualname__}.forward"
    checkpointed = []
    layer._gradient_checkpointing_func = counting(layer._gradient_checkpointing_func, checkpointed)
    args, kwargs = calls[0]
    through_call = layer(*args, **kwargs)
    assert len(checkpointed) == 1  # transformers checkpoints the layer's own call ...
    direct = forward(layer, *args, **kwargs)
    assert len(checkpointed) == 1  # ... and the unwrapped forward does not
    first = lambda output: output[0] if isinstance(output, tuple) else output  # noqa: E731
    torch.testing.assert_close(first(direct), first(through_call), rtol=0, atol=0)


def test_an_instance_forward_is_called_as_it_is():
    layer = nn.Linear(3, 3)
    layer.forward = lambda x: x * 2
    assert torch.equal(layer_forward_function(layer)(layer, torch.ones(3)), torch.full((3,), 2.0))


def test_gradient_checkpointing_enable_sets_what_checkpointed_call_uses():
    model = tiny_causal_lm("llama")
    layers = decoder_layers(model, "llama")
    assert not any(checkpointing_active(layer, True) for layer in layers)
    enable_checkpointing(model)
    for layer in layers:
        assert checkpointing_active(layer, True) and not checkpointing_active(layer, False)
        assert callable(layer._gradient_checkpointing_func)
        assert layer._can_checkpoint_with_cache in (True, False)
    seen = {}

    def function(hidden, **kwargs):
        seen.update(kwargs)
        return hidden * 3

    hidden = torch.randn(2, 3, requires_grad=True)
    out = checkpointed_call(
        layers[0],
        function,
        (hidden,),
        {"use_cache": True, "past_key_values": "cache", "cache": "cache"},
    )
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.full((2, 3), 3.0))
    assert seen["use_cache"] is False
    expected_cache = "cache" if layers[0]._can_checkpoint_with_cache else None
    assert seen["past_key_values"] == seen["cache"] == expected_cache
    with torch.no_grad():  # no backward to replay: transformers runs the layer as it is
        assert not checkpointing_active(layers[0], True)


def test_shared_hook_dicts_fire_once_and_stay_on_the_layer():
    layer = nn.Linear(3, 3)
    for name in FORWARD_HOOK_DICTS:
        assert isinstance(getattr(layer, name), dict), name

    class Block(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.forward(x)  # the layer's forward, not its __call__: no hooks

    block = Block(layer)
    share_forward_hooks(block, layer)
    fired = []
    layer.register_forward_hook(lambda module, args, out: fired.append("layer"))
    block.register_forward_pre_hook(lambda module, args: fired.append("block-pre"))
    block(torch.ones(3))
    assert fired == ["block-pre", "layer"]
    assert len(layer._forward_pre_hooks) == 1  # registered on the block, kept by the layer


def test_transformers_major_and_decoder_layers_returning_tensors():
    assert transformers_major() == int(transformers.__version__.split(".")[0])
    assert transformers_major() >= MIN_TRANSFORMERS_MAJOR_FOR_FUSING
    model = tiny_causal_lm("llama")
    args, kwargs = capture_layer_calls(model, "llama", INPUT_IDS)[0]
    with torch.no_grad():
        assert isinstance(decoder_layers(model, "llama")[0](*args, **kwargs), torch.Tensor)


def test_peft_lora_layout_and_switch():
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        expected = model(INPUT_IDS).logits
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False)
    )
    o_proj = model.model.layers[0].self_attn.o_proj
    b = lora_b_weight(o_proj, "default")
    assert b is o_proj.lora_B["default"].weight and tuple(b.shape) == (o_proj.out_features, 2)
    assert lora_b_weight(o_proj, "other") is None
    assert lora_b_weight(model.model.layers[0].self_attn.q_proj, "default") is None
    keys = peft.get_peft_model_state_dict(peft_model)
    assert keys and all(key.startswith(PEFT_MODEL_PREFIX) for key in keys)
    assert all(key.startswith(PEFT_MODEL_PREFIX) for key, _ in peft_model.named_parameters())
    assert peft_adapter_layers_enabled(model)
    peft_model.base_model.disable_adapter_layers()
    assert not peft_adapter_layers_enabled(model)
    with torch.no_grad():
        assert torch.equal(peft_model(INPUT_IDS).logits, expected)
    peft_model.base_model.enable_adapter_layers()
    assert peft_adapter_layers_enabled(model)


def test_trainer_attributes_the_loss_scaling_rule_reads(tmp_path):
    model = tiny_causal_lm("llama")
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=TokenDataset(4))
    assert isinstance(trainer.model_accepts_loss_kwargs, bool)
    assert hasattr(trainer, "compute_loss_func")
    # A causal LM takes num_items_in_batch, so its loss is normalised over the whole step.
    assert trainer_loss_is_scaled(trainer, num_items_in_batch=torch.tensor(10)) is True
    trainer.train()
    assert trainer_accumulation_steps(trainer) == 2


def test_checkpointed_call_clears_every_cache_name_transformers_clears():
    """transformers' own checkpointing wrapper drops the cache under names that vary by version;
    checkpointed_call must drop at least those (read from its source, so a new name fails here)."""
    import inspect
    import re

    from transformers.modeling_layers import GradientCheckpointingLayer

    source = inspect.getsource(GradientCheckpointingLayer)
    cleared = set(re.findall(r'kwargs\["(\w+)"\] = None', source))
    assert cleared, "transformers' checkpointing wrapper changed shape"
    seen = {}
    layer = nn.Linear(2, 2)
    layer._gradient_checkpointing_func = lambda function, *args: function(*args)
    checkpointed_call(
        layer, lambda x, **kwargs: seen.update(kwargs), (torch.ones(2),), dict.fromkeys(cleared, 1)
    )
    assert all(seen[name] is None for name in cleared), seen


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_a_4bit_weight_packs_two_values_per_byte_of_its_storage(tmp_path, storage):
    """parameter_count relies on bitsandbytes' 4-bit weight being a tensor of class Params4bit
    holding 2 * element_size() values per element, before and after its CPU repacking."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Params4bit

    original = save_tiny_causal_lm("llama", tmp_path)
    model = quantized_causal_lm(tmp_path, 4, bnb_4bit_quant_storage=storage)
    shapes = {name: p.shape for name, p in original.named_parameters()}
    quantized = {n: p for n, p in model.named_parameters() if isinstance(p, Params4bit)}
    assert quantized and type(next(iter(quantized.values()))).__name__ == BNB_4BIT_PARAMETER_CLASS
    # The first forward repacks every 4-bit weight for the CPU kernels, as uint8.
    for dtype in (storage, torch.uint8):
        for name, parameter in quantized.items():
            assert parameter.dtype == dtype
            assert parameter.numel() < shapes[name].numel()
            assert parameter_count(parameter) == shapes[name].numel(), name
        with torch.no_grad():
            model(input_ids=INPUT_IDS)
    others = [p for p in model.parameters() if not isinstance(p, Params4bit)]
    assert all(parameter_count(p) == p.numel() for p in others)


def test_a_parameter_deepspeed_partitioned_counts_its_ds_numel():
    parameter = nn.Parameter(torch.empty(0))
    parameter.ds_numel = 12
    assert parameter_count(parameter) == 12
    assert parameter_count(nn.Parameter(torch.ones(3, 4))) == 12
