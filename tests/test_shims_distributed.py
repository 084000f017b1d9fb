"""What steer_fast relies on in TRL, accelerate and the Trainer for training on several processes
and with TRL, checked against the installed versions: each test fails when that behaviour
changes (steer_fast.shims.trl_fused_lm_head, SteeringWrapper._no_split_modules, and the
settings docs/distributed.md documents)."""

from __future__ import annotations

import functools
import types

import peft
import pytest
import torch

import steer_fast
from steer_fast.distributed import fsdp_auto_wrap_policy
from steer_fast.injection import SteeredBlock
from steer_fast.shims import trl_fused_lm_head

from tiny_models import TokenDataset, random_input_ids, randomize_adapters, tiny_causal_lm

IDS = random_input_ids(2, 7, seed=3)


def steered(kind: str, layers=None):
    config = steer_fast.SteerConfig(rank=4, bias=True, layers=layers)
    if kind == "steer":
        model = steer_fast.get_steer_model(tiny_causal_lm("llama"), config)
    else:
        lora = peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
        model = steer_fast.get_joint_model(tiny_causal_lm("llama"), config, lora)
    randomize_adapters(model.get_adapters(), seed=1, std=0.3)
    return model.eval()


def next_token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# TRL's fused LM head
# ----------------------------------------------------------------------------------------------


def test_trl_installs_its_fused_lm_head_as_a_method_bound_to_the_model():
    """add_fused_lm_head assigns ``model.forward = MethodType(_fused_forward, model)``, whose
    fused path reads ``self.base_model(...).last_hidden_state`` (transformers' backbone)."""
    add_fused_lm_head = pytest.importorskip("trl.trainer.utils").add_fused_lm_head

    model = tiny_causal_lm("llama")
    reference = next_token_log_probs(model(IDS).logits, IDS)
    add_fused_lm_head(model)
    assert "forward" in vars(model)
    assert trl_fused_lm_head(model.forward, model) is not None
    output = model(input_ids=IDS, labels=IDS, fused_lm_head=True)
    torch.testing.assert_close(output.log_probs, reference, rtol=1e-5, atol=1e-5)
    # The backbone it reads is transformers' base_model, which a SteerModel's is not.
    assert model.base_model is model.model


def test_trl_fused_lm_head_is_not_mistaken_for_another_forward():
    model = tiny_causal_lm("llama")
    other = tiny_causal_lm("llama")
    assert trl_fused_lm_head(model.forward, model) is None
    assert trl_fused_lm_head(types.MethodType(type(model).forward, other), model) is None
    assert trl_fused_lm_head(lambda *args: None, model) is None


@pytest.mark.parametrize("kind", ["steer", "joint"])
def test_fused_lm_head_on_a_steered_model_runs_the_steered_blocks(kind):
    add_fused_lm_head = pytest.importorskip("trl.trainer.utils").add_fused_lm_head

    model = steered(kind)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        with model.disable_adapter():
            unsteered = model(input_ids=IDS).logits
    assert not torch.allclose(logits, unsteered, atol=1e-3)  # the adapters matter here
    add_fused_lm_head(model)
    with torch.no_grad():
        fused = model(input_ids=IDS, labels=IDS, fused_lm_head=True)
        plain = model(input_ids=IDS).logits
    torch.testing.assert_close(fused.log_probs, next_token_log_probs(logits, IDS))
    torch.testing.assert_close(plain, logits, rtol=0, atol=0)
    # accelerate's mixed precision takes ``model.forward.__func__``, wraps it and binds it to
    # the model again: the fused head must still reach the transformers model.
    function = model.forward.__func__

    @functools.wraps(function)
    def autocast_forward(*args, **kwargs):
        return function(*args, **kwargs)

    model.forward = types.MethodType(autocast_forward, model)
    with torch.no_grad():
        again = model(input_ids=IDS, labels=IDS, fused_lm_head=True)
    torch.testing.assert_close(again.log_probs, fused.log_probs, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# accelerate's FSDP plugin (the Trainer's fsdp settings)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["steer", "joint"])
def test_accelerate_fsdp2_shards_each_steered_block_through_no_split_modules(kind):
    """accelerate's transformer-based FSDP2 wrap (the Trainer's default with fsdp) shards the
    modules of the classes the model's ``_no_split_modules`` names: every SteeredBlock, and
    nothing inside one."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = steered(kind)
    assert model._no_split_modules == ["SteeredBlock"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap"
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    chosen = [module for module in model.modules() if policy(module)]
    blocks = [module for module in model.modules() if isinstance(module, SteeredBlock)]
    assert chosen == blocks and len(blocks) == 2


def test_accelerate_fsdp2_leaves_unsteered_layers_to_the_root_unit():
    """With some layers steered, the unsteered layers share their class with the layers inside
    the blocks, so the transformer-based wrap cannot name them: they stay in the root unit."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = steered("steer", layers=[0])
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap"
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    chosen = [name for name, module in model.named_modules() if policy(module)]
    assert chosen == ["base_model.model.layers.0"]


def test_accelerate_fsdp1_keeps_a_policy_set_on_its_plugin():
    """The one line for the Trainer's FSDP1: a callable set as the plugin's auto_wrap_policy is
    what accelerate wraps with (set_auto_wrap_policy leaves it as it is)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    model = steered("steer")
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1, auto_wrap_policy="transformer_based_wrap"
    )
    policy = fsdp_auto_wrap_policy(model)
    plugin.auto_wrap_policy = policy
    plugin.set_auto_wrap_policy(model)
    assert plugin.auto_wrap_policy is policy


# ----------------------------------------------------------------------------------------------
# The Trainer's DDP setting
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [(None, True), (False, False)])
def test_trainer_ddp_finds_unused_parameters_for_a_model_that_is_not_pretrained(
    given, expected, tmp_path
):
    """docs/distributed.md: for a model that is not a PreTrainedModel the Trainer asks DDP to
    find unused parameters unless ``ddp_find_unused_parameters`` says otherwise."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], ddp_find_unused_parameters=given
    )
    trainer = Trainer(model=steered("steer"), args=args, train_dataset=TokenDataset())
    assert trainer.accelerator.ddp_handler.find_unused_parameters is expected
