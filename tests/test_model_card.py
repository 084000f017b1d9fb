"""The base model an adapter records (SteerConfig.base_model_name_or_path / revision, PEFT's
fields of adapter_config.json), and the model card save_pretrained writes: huggingface_hub's
ModelCard, an existing README.md updated rather than replaced, and the atomic save kept."""

from __future__ import annotations

import json

import huggingface_hub
import peft
import pytest
import torch
import transformers

import steer_fast.saving.state as saved_state_module
from steer_fast import SteerConfig, SteerModel, get_joint_model, get_steer_model
from steer_fast.injection.layers import base_model_reference
from steer_fast.model_card import CARD_BEGIN, CARD_END

from hub_cache import offline_hub
from tiny_models import random_input_ids, tiny_causal_lm, tiny_config

FIXTURES_STEER = "fixtures/format2/steer_model"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No Hub requests: PEFT looks a Hub-named base's config up when it saves."""
    offline_hub(tmp_path, monkeypatch)


@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(folder)
    return folder


def named_base(base_folder, name=None):
    """The tiny llama loaded from its folder, under ``name`` (as if from the Hub) if given."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    if name is not None:
        model.name_or_path = model.config.name_or_path = name
    return model


def card(directory):
    return huggingface_hub.ModelCard((directory / "README.md").read_text(encoding="utf-8"))


def tree(directory):
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


# ----------------------------------------------------------------------------------------------
# The recorded base model
# ----------------------------------------------------------------------------------------------


def test_the_base_model_is_recorded_when_the_adapter_is_put_on_it(tmp_path, base_folder):
    assert base_model_reference(tiny_causal_lm("llama")) == (None, None)  # from a config
    # transformers 5 keeps no revision on the model; transformers 4 kept the snapshot's commit.
    expected_revision = getattr(named_base(base_folder).config, "_commit_hash", None)
    assert base_model_reference(named_base(base_folder)) == (str(base_folder), expected_revision)

    model = get_steer_model(named_base(base_folder), SteerConfig(rank=2, backend="torch"))
    model.add_adapter("vector", SteerConfig(rank=0, backend="torch"))
    for config in model.steer_configs.values():
        assert config.base_model_name_or_path == str(base_folder)
    model.save_pretrained(tmp_path / "adapter")
    for folder in (tmp_path / "adapter", tmp_path / "adapter" / "vector"):
        values = json.loads((folder / "steer_config.json").read_text())
        assert values["base_model_name_or_path"] == str(base_folder)
        assert values["revision"] is None

    # Set by hand, it is kept; it is a record, not a check: any base of the right shape loads.
    pinned = SteerConfig(rank=2, base_model_name_or_path="org/model", revision="abc123")
    model = get_steer_model(named_base(base_folder), pinned)
    assert (model.steer_config.base_model_name_or_path, model.steer_config.revision) == (
        "org/model",
        "abc123",
    )
    model.save_pretrained(tmp_path / "pinned")
    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "pinned")
    assert loaded.steer_config.base_model_name_or_path == "org/model"
    assert loaded.steer_config.revision == "abc123"
    state = loaded.state_dict()  # a Trainer checkpoint records it too, and loads elsewhere
    assert json.loads(bytes(state["_extra_state"].tolist()))["revision"] == "abc123"
    get_steer_model(named_base(base_folder), SteerConfig(rank=2)).load_state_dict(state)


def test_old_files_without_the_record_load(tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parent / FIXTURES_STEER
    assert "base_model_name_or_path" not in json.loads((folder / "steer_config.json").read_text())
    config = SteerConfig.from_json_file(folder / "steer_config.json")
    assert config.base_model_name_or_path is None and config.revision is None
    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), folder)
    assert loaded.steer_config.base_model_name_or_path is None


@pytest.mark.parametrize(
    "field, value",
    [("base_model_name_or_path", ""), ("base_model_name_or_path", 3), ("revision", ["main"])],
)
def test_bad_base_model_fields_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SteerConfig(**{field: value})


def test_the_joint_folder_records_the_base_in_both_configs(tmp_path, base_folder):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    steer = SteerConfig(rank=2, backend="torch", revision="v1.0")  # a revision, by hand
    model = get_joint_model(named_base(base_folder, "org/tiny-llama"), steer, lora)
    model.save_pretrained(tmp_path / "joint")
    steer_values = json.loads((tmp_path / "joint" / "steer_config.json").read_text())
    peft_values = json.loads((tmp_path / "joint" / "adapter_config.json").read_text())
    assert steer_values["base_model_name_or_path"] == "org/tiny-llama"
    assert peft_values["base_model_name_or_path"] == "org/tiny-llama"
    assert peft_values["revision"] == "v1.0" == steer_values["revision"]
    assert card(tmp_path / "joint").data.base_model == "org/tiny-llama"


# ----------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------


def test_save_pretrained_writes_a_model_card(tmp_path, base_folder):
    model = get_steer_model(named_base(base_folder, "org/tiny-llama"), SteerConfig(rank=2))
    model.add_adapter("french", SteerConfig(rank=0, layers=[1]))
    model.save_pretrained(tmp_path / "adapter")
    written = card(tmp_path / "adapter")
    assert written.data.library_name == "steer_fast"
    assert written.data.base_model == "org/tiny-llama"
    assert written.data.pipeline_tag == "text-generation"
    assert set(written.data.tags) == {
        "steer_fast",
        "activation-steering",
        "post-block-steering",
        "base_model:adapter:org/tiny-llama",
    }
    text = written.text
    assert "arXiv:2603.00425" in text and "Weight Updates as Activation Shifts" in text
    assert "| default | . | 2 | silu | block | all 2 | 1 | no |" in text
    assert "| french | french/ | vector | identity | block | 1 |" in text
    assert f'from_pretrained("{tmp_path / "adapter"}")' in text
    assert "load_adapter(" in text and 'subfolder="french"' in text
    assert not (tmp_path / "adapter" / "french" / "README.md").exists()
    model.save_pretrained(tmp_path / "french-only", selected_adapters=["french"])
    assert (
        f'from_pretrained("{tmp_path / "french-only"}", subfolder="french")'
        in card(tmp_path / "french-only").text
    )

    # A local-path base is named in the text, not as the Hub's base_model; a bare decoder
    # (no LM head) gets no pipeline tag.
    bare = transformers.LlamaModel(tiny_config("llama"))
    get_steer_model(bare, SteerConfig(rank=2)).save_pretrained(tmp_path / "bare")
    get_steer_model(named_base(base_folder), SteerConfig(rank=2)).save_pretrained(tmp_path / "l")
    assert card(tmp_path / "bare").data.pipeline_tag is None
    local = card(tmp_path / "l")
    assert local.data.base_model is None and f"`{base_folder}`" in local.text


def test_an_existing_readme_is_updated_not_replaced(tmp_path):
    target = tmp_path / "adapter"
    get_steer_model(tiny_causal_lm("llama"), SteerConfig(rank=2)).save_pretrained(target)
    mine = "---\nlicense: mit\npipeline_tag: text2text-generation\ntags:\n- mine\n---\n"
    (target / "README.md").write_text(mine + "# My adapter\n\nIt speaks French.\n")
    model = get_steer_model(tiny_causal_lm("llama"), SteerConfig(rank=3))
    model.save_pretrained(target)
    first = (target / "README.md").read_text()
    updated = card(target)
    assert updated.data.license == "mit" and updated.data.pipeline_tag == "text2text-generation"
    assert {"mine", "steer_fast"} <= set(updated.data.tags)
    assert updated.text.lstrip().startswith("# My adapter\n\nIt speaks French.")
    assert updated.text.count(CARD_BEGIN) == 1 and "| default | . | 3 |" in updated.text
    # Saving again rewrites steer_fast's section only: the author's text stays as it is.
    edited = first.replace("It speaks French.", "It speaks French and Occitan.")
    (target / "README.md").write_text(edited + "\nA footer.\n")
    get_steer_model(tiny_causal_lm("llama"), SteerConfig(rank=4)).save_pretrained(target)
    again = (target / "README.md").read_text()
    assert "French and Occitan" in again and again.rstrip().endswith("A footer.")
    assert again.count(CARD_BEGIN) == again.count(CARD_END) == 1 and "| default | . | 4 |" in again


def test_a_broken_readme_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "adapter"
    get_steer_model(tiny_causal_lm("llama"), SteerConfig(rank=2)).save_pretrained(target)
    (target / "README.md").write_text("---\ntags: [unclosed\n---\ntext\n")
    before = tree(target)
    with pytest.raises(ValueError, match="save_directory: .*README.md has a metadata block"):
        get_steer_model(tiny_causal_lm("llama"), SteerConfig(rank=3)).save_pretrained(target)
    assert tree(target) == before
    assert not list(tmp_path.glob(".adapter.*"))  # no staging directory left


def test_a_failed_save_leaves_the_old_card(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    get_steer_model(tiny_causal_lm("llama"), SteerConfig(rank=2)).save_pretrained(target)
    (target / "README.md").write_text("# Notes\n")
    before = tree(target)

    def failing_save_file(tensors, filename, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(saved_state_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        get_steer_model(tiny_causal_lm("llama"), SteerConfig(rank=3)).save_pretrained(target)
    assert tree(target) == before


def test_the_joint_card_describes_both_parts(tmp_path):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    model = get_joint_model(tiny_causal_lm("llama"), SteerConfig(rank=2), lora)
    model.save_pretrained(tmp_path / "joint")
    written = card(tmp_path / "joint")
    assert {"lora", "peft", "steer_fast"} <= set(written.data.tags)
    assert written.data.library_name == "steer_fast"
    assert "LoRA + post-block steering" in written.text
    assert "r=2, lora_alpha=4, target_modules=['down_proj', 'q_proj']" in written.text
    assert "constraint=down_projection" in written.text
    # The card does not change what loads.
    loaded = type(model).from_pretrained(tiny_causal_lm("llama"), tmp_path / "joint")
    ids = random_input_ids(1, 4)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
