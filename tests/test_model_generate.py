"""generate with the KV cache: greedy tokens equal the forward-hook reference's, also for
left-padded batches with an attention mask."""

import copy

import pytest
import torch

from steer_fast import SteerConfig, get_steer_model

from tiny_models import (
    FAMILIES,
    PAD_TOKEN_ID,
    add_reference_steering,
    random_input_ids,
    randomize_adapters,
    tiny_causal_lm,
)

NEW_TOKENS = 6


def steered_and_reference(family):
    base = tiny_causal_lm(family)
    reference = copy.deepcopy(base)
    model = get_steer_model(base, SteerConfig(rank=4, activation="gelu", backend="torch"))
    randomize_adapters(model.get_adapters(), seed=3)
    add_reference_steering(reference, family, model.get_adapters())
    return base, model, reference


def greedy(model, input_ids, **kwargs):
    return model.generate(
        input_ids,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        pad_token_id=PAD_TOKEN_ID,
        **kwargs,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_the_hook_reference(family):
    base, model, reference = steered_and_reference(family)
    input_ids = random_input_ids(2, 5, seed=1)
    tokens = greedy(model, input_ids)
    assert tokens.shape == (2, 5 + NEW_TOKENS)
    assert torch.equal(tokens, greedy(reference, input_ids))
    with model.disable_steering():
        unsteered = greedy(model, input_ids)
    assert not torch.equal(tokens, unsteered)  # the steering changes what is generated


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_with_attention_mask(family):
    _, model, reference = steered_and_reference(family)
    prompts = random_input_ids(2, 6, seed=2)
    padded = prompts.clone()
    mask = torch.ones_like(prompts)
    padded[1, :2] = PAD_TOKEN_ID
    mask[1, :2] = 0
    tokens = greedy(model, padded, attention_mask=mask)
    assert torch.equal(tokens, greedy(reference, padded, attention_mask=mask))
    # The padded row generates what its prompt generates alone.
    alone = greedy(model, prompts[1:, 2:])
    assert torch.equal(tokens[1, 2:], alone[0])
