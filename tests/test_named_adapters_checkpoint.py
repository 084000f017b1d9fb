"""Several named adapters in a SteerModel's state_dict and Trainer checkpoints: the extra state
names every adapter with its config; load_state_dict (the Trainer's resume) checks them all
before copying anything; SteerModel.from_pretrained of a Trainer checkpoint restores every
adapter, e.g. after the Trainer trained them together on mixed batches."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from steer_fast import SteerConfig, SteerModel, get_steer_model
from steer_fast.constants import NAMED_ADAPTERS_KEY

from tiny_models import TokenDataset, random_input_ids, tiny_causal_lm

INPUT_IDS = random_input_ids(2, 6)
DEFAULT = SteerConfig(rank=4, bias=True, backend="torch")
OTHERS = {
    "narrow": SteerConfig(rank=2, activation="identity", scale=0.5, layers=[1], backend="torch"),
    "mlp": SteerConfig(rank=3, activation="gelu", site="mlp", backend="torch"),
}
NAMES = ["default", *OTHERS]


def base():
    # Tied embeddings: a full state_dict would hold shared tensors, which safetensors refuses.
    return tiny_causal_lm("llama", tie_word_embeddings=True)


def steered(seed, others=OTHERS):
    torch.manual_seed(seed)
    model = get_steer_model(base(), DEFAULT)
    for name, config in others.items():
        model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def logits_per_adapter(model):
    model.eval()
    with torch.no_grad():
        return {
            name: model(input_ids=INPUT_IDS, adapter_names=[name] * 2).logits
            for name in model.list_adapters()
        }


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "_extra_state"}


def test_extra_state_names_every_adapter():
    model = steered(0)
    state = json.loads(bytes(model.state_dict()["_extra_state"].tolist()))
    assert state[NAMED_ADAPTERS_KEY] == [
        [name, model.steer_configs[name].to_dict()]
        for name in OTHERS  # in loading order
    ]
    assert state["rank"] == 4 and state[NAMED_ADAPTERS_KEY][1][1]["site"] == ["mlp"]
    # One adapter: the state is the default config alone, as it always was.
    single = get_steer_model(base(), DEFAULT)
    assert NAMED_ADAPTERS_KEY not in json.loads(bytes(single.state_dict()["_extra_state"].tolist()))


def test_load_state_dict_restores_every_adapter_and_its_scale():
    source = steered(0)
    source.set_scale(1.5, adapter_name="narrow")
    target = steered(1)
    target.load_state_dict(source.state_dict())
    assert target.steer_configs["narrow"].scale == 1.5
    want, got = logits_per_adapter(source), logits_per_adapter(target)
    for name in NAMES:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("case", ["adapter not loaded", "another rank"])
def test_load_state_dict_of_other_adapters_raises_and_changes_nothing(case):
    source = steered(0)
    if case == "adapter not loaded":
        target = steered(1, others={"narrow": OTHERS["narrow"]})
        message = "holds adapter 'mlp', which this model has not loaded"
    else:
        target = steered(
            1,
            others={
                **OTHERS,
                "mlp": SteerConfig(rank=5, activation="gelu", site="mlp", backend="torch"),
            },
        )
        message = "adapter 'mlp'"
    before = adapter_state(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(source.state_dict(), strict=False)
    after = adapter_state(target)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_trainer_trains_mixed_batches_and_its_checkpoint_restores_every_adapter(tmp_path):
    """The Trainer runs mixed batches (the collator names an adapter per row) and trains every
    adapter from its rows; its checkpoint holds them all, from_pretrained restores them all and
    a resumed run ends where the uninterrupted one did."""
    names = NAMES * 2  # row i of a batch of 4 (with 16 rows, i mod 3 on every row)

    def collate(rows):
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        return dict(batch, adapter_names=[names[i % len(names)] for i in range(len(rows))])

    def args(output_dir):
        return TrainingArguments(
            output_dir=str(output_dir),
            max_steps=4,
            save_steps=2,
            per_device_train_batch_size=4,
            learning_rate=5e-2,
            use_cpu=True,
            report_to=[],
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            logging_steps=100,
            remove_unused_columns=False,
        )

    uninterrupted = steered(0)
    initial = adapter_state(uninterrupted)
    Trainer(
        model=uninterrupted,
        args=args(tmp_path / "a"),
        train_dataset=TokenDataset(),
        data_collator=collate,
    ).train()
    final = adapter_state(uninterrupted)
    for name in ("steer_adapter.default.", ".narrow.", ".mlp."):
        assert any(name in key and not torch.equal(initial[key], final[key]) for key in final)

    checkpoint = tmp_path / "a" / "checkpoint-4"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"_extra_state", *final}
    loaded = SteerModel.from_pretrained(base(), checkpoint)
    assert loaded.list_adapters() == NAMES
    want, got = logits_per_adapter(uninterrupted), logits_per_adapter(loaded)
    for name in NAMES:
        assert torch.equal(got[name], want[name]), name
    assert not any(p.requires_grad for p in loaded.parameters())

    resumed = steered(1)
    trainer = Trainer(
        model=resumed,
        args=args(tmp_path / "b"),
        train_dataset=TokenDataset(),
        data_collator=collate,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    after = adapter_state(resumed)
    for key in final:
        torch.testing.assert_close(after[key], final[key], rtol=1e-6, atol=1e-7)


def test_from_pretrained_checks_every_adapter_before_touching_the_model(tmp_path):
    """A Trainer checkpoint whose second adapter does not fit the model: ValueError, and the
    model is not steered."""
    source = steered(0, others={"narrow": SteerConfig(rank=2, layers=[1], backend="torch")})
    state = source.state_dict()
    extra = json.loads(bytes(state["_extra_state"].tolist()))
    extra[NAMED_ADAPTERS_KEY][0][1]["num_layers"] = 5  # saved for a 5-layer base model
    state["_extra_state"] = torch.tensor(list(json.dumps(extra).encode()), dtype=torch.uint8)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    model = base()
    layers_before = [type(layer) for layer in model.model.layers]
    with pytest.raises(ValueError, match="num_layers"):
        SteerModel.from_pretrained(model, tmp_path)
    assert [type(layer) for layer in model.model.layers] == layers_before
