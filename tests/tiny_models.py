"""Tiny random-init transformers models for tests, and the forward-hook steering reference.

Every model is built from its transformers config class (nothing is downloaded): hidden size 32,
2 decoder layers, 4 heads, vocabulary 128, dropout 0 unless asked for.

    model = tiny_causal_lm("llama")                 # eval mode, fp32, seeded
    handles = add_reference_steering(model, adapters)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import nn

from steer_fast import PostBlockAdapter
from steer_fast.ops import reference_post_block_steer

VOCAB_SIZE = 128
HIDDEN_SIZE = 32
NUM_LAYERS = 2
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2

# The families the steering features are tested on (the required list) ...
FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
)
# ... and the other families in steer_fast.injection.families' table, checked for the fused path.
EXTRA_FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "gemma",
    "gemma2",
    "olmo",
    "olmo3",
    "starcoder2",
)
ALL_FAMILIES: tuple[str, ...] = FAMILIES + EXTRA_FAMILIES

# The path each family's layers take with fuse_residual=True.
EXPECTED_PATH: dict[str, str] = {
    family: ("plain" if family in ("gpt2", "gpt_neox") else "fused") for family in ALL_FAMILIES
}

# Where each family keeps its decoder layers (written out here, independently of steer_fast).
LAYERS_PATH: dict[str, str] = {
    family: {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}.get(family, "model.layers")
    for family in ALL_FAMILIES
}

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=PAD_TOKEN_ID,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
)


def _alternating_layer_types(num_layers: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]


def tiny_config(
    family: str,
    *,
    dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    hidden_size: int = HIDDEN_SIZE,
    num_layers: int = NUM_LAYERS,
) -> transformers.PretrainedConfig:
    """The tiny config of ``family`` (a name from ALL_FAMILIES). hidden_size: a multiple of 8."""
    tie = {"tie_word_embeddings": tie_word_embeddings}
    sizes = {"hidden_size": hidden_size, "num_hidden_layers": num_layers}
    common = {**_COMMON, **tie, **sizes}
    if family == "llama":
        return transformers.LlamaConfig(**common, attention_dropout=dropout)
    if family == "mistral":
        return transformers.MistralConfig(**common, attention_dropout=dropout, sliding_window=4)
    if family == "mixtral":
        return transformers.MixtralConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, attention_dropout=dropout
        )
    if family == "qwen2":
        return transformers.Qwen2Config(**common, attention_dropout=dropout)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            attention_dropout=dropout,
        )
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=8, attention_dropout=dropout)
    if family == "gemma":
        return transformers.GemmaConfig(**common, head_dim=8, attention_dropout=dropout)
    if family == "gemma2":
        return transformers.Gemma2Config(
            **common,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            attention_dropout=dropout,
        )
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(
            **common,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=_alternating_layer_types(num_layers),
            attention_dropout=dropout,
        )
    if family == "phi3":
        return transformers.Phi3Config(
            **common,
            original_max_position_embeddings=64,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attention_dropout=dropout,
        )
    if family == "olmo":
        return transformers.OlmoConfig(**common, attention_dropout=dropout)
    if family == "olmo2":
        return transformers.Olmo2Config(**common, attention_dropout=dropout)
    if family == "olmo3":
        return transformers.Olmo3Config(
            **common,
            sliding_window=4,
            layer_types=_alternating_layer_types(num_layers),
            attention_dropout=dropout,
        )
    if family == "starcoder2":
        return transformers.Starcoder2Config(
            **common,
            residual_dropout=dropout,
            embedding_dropout=dropout,
            attention_dropout=dropout,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=64,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            **tie,
        )
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            vocab_size=VOCAB_SIZE,
            intermediate_size=64,
            num_attention_heads=4,
            **sizes,
            max_position_embeddings=64,
            hidden_dropout=dropout,
            attention_dropout=dropout,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
            **tie,
        )
    raise ValueError(f"family must be one of {ALL_FAMILIES}, got {family!r}")


def tiny_causal_lm(
    family: str,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    dropout: float = 0.0,
    tie_word_embeddings: bool = False,
    hidden_size: int = HIDDEN_SIZE,
    num_layers: int = NUM_LAYERS,
) -> transformers.PreTrainedModel:
    """A tiny ``AutoModelForCausalLM`` of ``family`` with seeded random weights, in eval mode."""
    config = tiny_config(
        family,
        dropout=dropout,
        tie_word_embeddings=tie_word_embeddings,
        hidden_size=hidden_size,
        num_layers=num_layers,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def decoder_layers(model: nn.Module, family: str) -> nn.ModuleList:
    """The decoder-layer list of a tiny ``family`` model."""
    return model.get_submodule(LAYERS_PATH[family])


def enable_checkpointing(model: nn.Module, **kwargs) -> None:
    """Turn on transformers' activation checkpointing with ``kwargs`` (e.g. use_reentrant) under
    the name of the installed version: activation_checkpointing_enable from 5.2x on,
    gradient_checkpointing_enable (deprecated there) before."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def random_input_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] token ids in 3..VOCAB_SIZE-1 (no pad, bos or eos)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=generator)


def randomize_adapters(
    adapters: Mapping[int, PostBlockAdapter], seed: int = 0, std: float = 0.3
) -> None:
    """Give every adapter parameter N(0, std^2) values (a new adapter is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index in sorted(adapters):
            for parameter in adapters[index].parameters():
                values = torch.randn(parameter.shape, generator=generator) * std
                parameter.copy_(values)


def randomize_trainable(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """N(0, std^2) values for every trainable parameter of ``model``, in name order (new
    adapters start as the identity: this gives them directions)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def add_reference_steering(
    model: nn.Module, family: str, adapters: Mapping[int, PostBlockAdapter]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Steer ``model`` the unfused way: a forward hook on each decoder layer adds the adapter to
    the layer's output (a tensor or the first element of a tuple), with steer_fast's eager
    reference maths. Returns the hook handles."""
    layers = decoder_layers(model, family)
    handles = []
    for index, adapter in adapters.items():

        def hook(module, args, output, adapter=adapter):
            hidden = output[0] if isinstance(output, tuple) else output
            steered = reference_post_block_steer(
                hidden,
                adapter.down.weight,
                adapter.up.weight,
                adapter.down.bias,
                adapter.up.bias,
                activation=adapter.activation,
                scale=adapter.scale,
            )
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handles.append(layers[index].register_forward_hook(hook))
    return handles


def capture_layer_calls(
    model: nn.Module, family: str, input_ids: torch.Tensor
) -> dict[int, tuple[tuple, dict]]:
    """The (args, kwargs) each decoder layer of ``model`` gets in ``model(input_ids)``."""
    calls = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: calls.__setitem__(index, (args, kwargs)),
            with_kwargs=True,
        )
        for index, layer in enumerate(decoder_layers(model, family))
    ]
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token rows for Trainer runs, with the inputs as labels."""

    def __init__(self, rows: int = 16, length: int = 8) -> None:
        self.input_ids = random_input_ids(rows, length, seed=11)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "labels": self.input_ids[index]}


def char_tokenizer(lowercase: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, newline and the ellipsis (100 ids, so it
    fits tiny_models' vocabulary), adding <s> in front of text with special tokens."""
    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID}
    for char in ["\n", "\u2026", *map(chr, range(32, 127))]:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS_TOKEN_ID)]
    )
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


# bitsandbytes' CPU kernels need in_features of at least its 4-bit block size (64).
QUANTIZED_HIDDEN_SIZE = 64


def save_tiny_causal_lm(family: str, directory, **kwargs) -> transformers.PreTrainedModel:
    """Save tiny_causal_lm(family, hidden_size=QUANTIZED_HIDDEN_SIZE, **kwargs) to ``directory``
    (for quantized_causal_lm to load); returns the unquantized model."""
    model = tiny_causal_lm(family, hidden_size=QUANTIZED_HIDDEN_SIZE, **kwargs)
    model.save_pretrained(directory)
    return model


def quantized_causal_lm(directory, bits: int = 4, **options) -> transformers.PreTrainedModel:
    """The model saved in ``directory`` loaded by transformers with bitsandbytes quantization
    (``bits`` 4: nf4, or 8; ``options`` go to BitsAndBytesConfig), on the CPU, in eval mode."""
    if bits == 4:
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", **options
        )
    elif bits == 8:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True, **options)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization, device_map="cpu"
    )
    return model.eval()
