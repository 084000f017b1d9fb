"""Hub ids and one-call loading, offline: adapters and bases in a Hub cache laid out as
huggingface_hub lays it out (``hub_cache``), SteerModel / load_adapter / JointModel /
AutoSteerModelForCausalLM resolving them, the errors of what cannot be had, and push_to_hub
with HfApi's network methods replaced (the real upload is not tested here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import peft
import pytest
import torch
import transformers
from huggingface_hub.errors import EntryNotFoundError

from steer_fast import (
    AutoSteerModelForCausalLM,
    JointModel,
    SteerConfig,
    SteerModel,
    get_joint_model,
    get_steer_model,
)

from hub_cache import cache_files, offline_hub, publish
from tiny_models import random_input_ids, randomize_trainable, tiny_causal_lm

INPUT_IDS = random_input_ids(3, 6)
NAMES = ["default", "french", "__base__"]


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, **kwargs).logits


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test offline, with an empty Hub cache of its own."""
    return offline_hub(tmp_path, monkeypatch)


@pytest.fixture
def base_folder(tmp_path):
    """A tiny llama saved as a transformers checkpoint."""
    folder = tmp_path / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(folder)
    return folder


def steered(base, **overrides):
    """A SteerModel on ``base`` with a default and a "french" adapter, randomised."""
    settings = {"rank": 2, "backend": "torch", **overrides}
    model = get_steer_model(base, SteerConfig(**settings))
    model.add_adapter("french", SteerConfig(rank=0, layers=[1], backend="torch"))
    randomize_trainable(model, seed=3)
    return model


def joint(base):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_joint_model(base, SteerConfig(rank=2, backend="torch"), lora)
    randomize_trainable(model, seed=4)
    return model


def test_the_cache_is_the_one_huggingface_hub_reads(cache, tmp_path):
    steered(tiny_causal_lm("llama")).save_pretrained(tmp_path / "adapter")
    commit = publish(cache, "user/llama-steer", tmp_path / "adapter")
    report = huggingface_hub.scan_cache_dir(cache)
    assert report.warnings == []
    (repo,) = report.repos
    assert repo.repo_id == "user/llama-steer" and set(repo.refs) == {"main"}
    (revision,) = repo.revisions
    assert revision.commit_hash == commit
    tree = huggingface_hub.get_cached_repo_tree("user/llama-steer", cache_dir=cache)
    assert sorted(f.path for f in tree) == sorted(
        ["README.md", "steer_config.json", "steer_model.safetensors"]
        + ["french/steer_config.json", "french/steer_model.safetensors"]
    )
    cached = huggingface_hub.try_to_load_from_cache("user/llama-steer", "steer_config.json")
    assert cached == str(
        cache / "models--user--llama-steer" / "snapshots" / commit / "steer_config.json"
    )


def test_steer_model_and_load_adapter_take_hub_ids(cache, tmp_path):
    model = steered(tiny_causal_lm("llama"))
    expected, mixed = logits(model), logits(model, adapter_names=NAMES)
    model.save_pretrained(tmp_path / "adapter")
    commit = publish(cache, "user/llama-steer", tmp_path / "adapter")

    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), "user/llama-steer")
    assert loaded.list_adapters() == ["default"]  # the top one, as PEFT
    loaded.load_adapter("user/llama-steer", "french", subfolder="french")
    assert torch.equal(logits(loaded), expected)
    assert torch.equal(logits(loaded, adapter_names=NAMES), mixed)

    pinned = SteerModel.from_pretrained(
        tiny_causal_lm("llama"), "user/llama-steer", revision=commit
    )
    assert torch.equal(logits(pinned), expected)
    # A subfolder of a local folder, as of a repo.
    local = SteerModel.from_pretrained(
        tiny_causal_lm("llama"), tmp_path / "adapter", subfolder="french"
    )
    assert local.steer_config.rank == 0


def test_a_local_folder_wins_over_the_hub(cache, tmp_path, monkeypatch):
    steered(tiny_causal_lm("llama")).save_pretrained(tmp_path / "hub-copy")
    publish(cache, "user/llama-steer", tmp_path / "hub-copy")
    monkeypatch.chdir(tmp_path)
    steered(tiny_causal_lm("llama"), rank=3).save_pretrained(Path("user") / "llama-steer")
    loaded = SteerModel.from_pretrained(tiny_causal_lm("llama"), "user/llama-steer")
    assert loaded.steer_config.rank == 3


def test_a_hub_id_offline_and_not_cached_is_refused_naming_the_argument(cache, base_folder):
    model = tiny_causal_lm("llama")
    before = [(name, id(module)) for name, module in model.named_modules()]
    files = cache_files(cache)
    for call, argument in [
        (lambda: SteerModel.from_pretrained(model, "user/absent"), "save_directory"),
        (lambda: JointModel.from_pretrained(model, "user/absent"), "save_directory"),
        (lambda: AutoSteerModelForCausalLM.from_pretrained("user/absent"), "pretrained_model"),
    ]:
        with pytest.raises(ValueError, match=rf"^{argument}.*'user/absent'.*HF_HUB_OFFLINE"):
            call()
    steerer = steered(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match=r"^model_id: 'user/absent'.*not \(fully\) in the cache"):
        steerer.load_adapter("user/absent", "other")
    assert steerer.list_adapters() == ["default", "french"]
    assert [(name, id(module)) for name, module in model.named_modules()] == before
    assert cache_files(cache) == files  # nothing written, not even to the cache

    # A cached repo without an adapter (a base model), and a missing revision.
    publish(cache, "user/tiny-llama", base_folder)
    with pytest.raises(ValueError, match="holds no steer_fast adapter"):
        SteerModel.from_pretrained(model, "user/tiny-llama")
    with pytest.raises(ValueError, match="save_directory.*revision 'v2'"):
        SteerModel.from_pretrained(model, "user/tiny-llama", revision="v2")
    for bad, match in [
        ({"subfolder": "../up"}, "subfolder"),
        ({"revison": "main"}, "unknown keyword arguments"),
        ({"local_files_only": "yes"}, "local_files_only"),
    ]:
        with pytest.raises(ValueError, match=match):
            SteerModel.from_pretrained(model, "user/tiny-llama", **bad)
    assert [(name, id(module)) for name, module in model.named_modules()] == before


def test_the_environment_alone_points_the_client_at_the_cache(cache, tmp_path):
    """HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets them, read by a fresh interpreter (which
    imports huggingface_hub only when a repo id is resolved)."""
    steered(tiny_causal_lm("llama")).save_pretrained(tmp_path / "adapter")
    commit = publish(cache, "user/llama-steer", tmp_path / "adapter")
    script = (
        "import sys, steer_fast\n"  # importing steer_fast imports none of them
        "assert not {'huggingface_hub', 'transformers', 'peft'} & set(sys.modules)\n"
        "from steer_fast.hub import resolve_adapter\n"
        "print(resolve_adapter('user/llama-steer', subfolder='french'))\n"
        "try:\n    resolve_adapter('user/absent')\n"
        "except ValueError as error:\n    print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    found, error = result.stdout.splitlines()[:2]
    assert found == str(cache / "models--user--llama-steer" / "snapshots" / commit / "french")
    assert "HF_HUB_OFFLINE is set" in error


# ----------------------------------------------------------------------------------------------
# AutoSteerModelForCausalLM
# ----------------------------------------------------------------------------------------------


def test_auto_loads_the_recorded_hub_base_and_the_adapter(cache, tmp_path, base_folder):
    publish(cache, "user/tiny-llama", base_folder)
    base = transformers.AutoModelForCausalLM.from_pretrained("user/tiny-llama")
    model = steered(base)
    assert model.steer_config.base_model_name_or_path == "user/tiny-llama"
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    publish(cache, "user/tiny-llama-steer", tmp_path / "adapter")

    loaded = AutoSteerModelForCausalLM.from_pretrained("user/tiny-llama-steer")
    assert isinstance(loaded, SteerModel) and loaded.list_adapters() == ["default"]
    assert torch.equal(logits(loaded), expected)
    assert not loaded.training and loaded.get_nb_trainable_parameters()[0] == 0
    # kwargs go to the base's from_pretrained; is_trainable and backend to steer_fast.
    wide = AutoSteerModelForCausalLM.from_pretrained(
        tmp_path / "adapter", True, "torch", dtype=torch.float64
    )
    assert wide.get_base_model().dtype == torch.float64 and wide.get_nb_trainable_parameters()[0]
    with pytest.raises(OSError, match="from_pretrained"):
        AutoSteerModelForCausalLM()


def test_auto_loads_a_local_base_and_a_joint_folder(cache, tmp_path, base_folder):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    model = joint(base)
    expected = logits(model)
    model.save_pretrained(tmp_path / "joint")
    peft_config = json.loads((tmp_path / "joint" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == str(base_folder)

    loaded = AutoSteerModelForCausalLM.from_pretrained(tmp_path / "joint")
    assert isinstance(loaded, JointModel)
    assert torch.equal(logits(loaded), expected)
    # The same folder as a Hub repo, for JointModel.from_pretrained and the Auto class.
    publish(cache, "user/llama-joint", tmp_path / "joint")
    for loaded in (
        JointModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base_folder), "user/llama-joint"
        ),
        AutoSteerModelForCausalLM.from_pretrained("user/llama-joint"),
    ):
        assert isinstance(loaded, JointModel) and torch.equal(logits(loaded), expected)


def test_auto_refuses_a_base_it_cannot_load_naming_it(cache, tmp_path, base_folder):
    model = steered(tiny_causal_lm("llama"))  # built from a config: no name to record
    model.save_pretrained(tmp_path / "unnamed")
    with pytest.raises(ValueError, match="pretrained_model_name_or_path: .* records no base model"):
        AutoSteerModelForCausalLM.from_pretrained(tmp_path / "unnamed")

    steered(transformers.AutoModelForCausalLM.from_pretrained(base_folder)).save_pretrained(
        tmp_path / "moved"
    )
    os.rename(base_folder, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=rf"base model '{base_folder}'.*not a folder on this"):
        AutoSteerModelForCausalLM.from_pretrained(tmp_path / "moved")

    config = SteerConfig(rank=2, backend="torch", base_model_name_or_path="user/absent-base")
    get_steer_model(tiny_causal_lm("llama"), config).save_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="'user/absent-base'.*not in the Hub cache.*HF_HUB_OFF"):
        AutoSteerModelForCausalLM.from_pretrained(tmp_path / "absent")

    for bad, match in [({"is_trainable": "no"}, "is_trainable"), ({"backend": "cuda"}, "backend")]:
        with pytest.raises(ValueError, match=match):
            AutoSteerModelForCausalLM.from_pretrained(tmp_path / "absent", **bad)
    with pytest.raises(ValueError, match="not a directory"):
        AutoSteerModelForCausalLM.from_pretrained(tmp_path / "missing")


def test_auto_reads_the_base_of_an_old_joint_folder_from_peft(tmp_path, base_folder):
    """A joint folder whose steer_config.json predates the record: PEFT's adapter_config.json
    names the base."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    model = joint(base)
    model.save_pretrained(tmp_path / "joint")
    path = tmp_path / "joint" / "steer_config.json"
    values = json.loads(path.read_text())
    del values["base_model_name_or_path"], values["revision"]
    path.write_text(json.dumps(values))
    assert torch.equal(
        logits(AutoSteerModelForCausalLM.from_pretrained(path.parent)), logits(model)
    )


# ----------------------------------------------------------------------------------------------
# push_to_hub (HfApi's network calls replaced)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch):
    """Replaces HfApi's network methods; records each call (an upload with the files it had)."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*")
            if p.is_file()
        }
        calls.append(("upload_folder", repo_id, {**kwargs, "files": files}))
        return "commit-info"

    def hf_hub_download(self, repo_id, filename, **kwargs):
        calls.append(("hf_hub_download", repo_id, {"filename": filename, **kwargs}))
        if calls.readme is None:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(calls.readme)

    calls = type("Calls", (list,), {"readme": None})()
    for name, method in [
        ("create_repo", create_repo),
        ("create_branch", create_branch),
        ("upload_folder", upload_folder),
        ("hf_hub_download", hf_hub_download),
    ]:
        monkeypatch.setattr(huggingface_hub.HfApi, name, method)
    return calls


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, hub_calls):
    model = steered(tiny_causal_lm("llama"))
    model.save_pretrained(tmp_path / "saved")
    result = model.push_to_hub("user/llama-steer", private=True, commit_message="first")
    assert result == "commit-info"
    assert [call[0] for call in hub_calls] == ["hf_hub_download", "create_repo", "upload_folder"]
    assert hub_calls[1][2]["private"] is True
    upload = hub_calls[2][2]
    assert upload["commit_message"] == "first" and upload["revision"] is None
    saved = {
        p.relative_to(tmp_path / "saved").as_posix(): p.read_bytes()
        for p in (tmp_path / "saved").rglob("*")
        if p.is_file()
    }
    assert upload["files"].keys() == saved.keys()
    assert all(upload["files"][name] == saved[name] for name in saved if name != "README.md")
    card = upload["files"]["README.md"].decode()
    assert 'from_pretrained("user/llama-steer")' in card and str(tmp_path) not in card

    # The repo's own README is merged into the card, and a branch is created for revision.
    hub_calls.clear()
    hub_calls.readme = tmp_path / "hub-readme.md"
    hub_calls.readme.write_text("---\nlicense: mit\ntags:\n- mine\n---\n# My adapter\n")
    model.push_to_hub("user/llama-steer", revision="dev", selected_adapters=["default"])
    assert [call[0] for call in hub_calls][-2:] == ["create_branch", "upload_folder"]
    upload = hub_calls[-1][2]
    assert upload["revision"] == "dev" and "french/steer_config.json" not in upload["files"]
    card = huggingface_hub.ModelCard(upload["files"]["README.md"].decode())
    assert card.data.license == "mit" and {"mine", "steer_fast"} <= set(card.data.tags)
    assert card.text.lstrip().startswith("# My adapter")


def test_push_to_hub_refuses_bad_arguments_before_touching_the_hub(tmp_path, hub_calls):
    model = steered(tiny_causal_lm("llama"))
    for kwargs, match in [
        ({"repo_id": "not/a/repo"}, "repo_id"),
        ({"repo_id": "user/x", "commit_message": 3}, "commit_message"),
        ({"repo_id": "user/x", "private": "yes"}, "private"),
        ({"repo_id": "user/x", "selected_adapters": ["german"]}, "selected_adapters"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.push_to_hub(**kwargs)
    assert hub_calls == []
    assert model.push_to_hub("user/x", is_main_process=False) is None and hub_calls == []


def test_joint_model_push_to_hub(tmp_path, hub_calls, base_folder):
    model = joint(transformers.AutoModelForCausalLM.from_pretrained(base_folder))
    model.push_to_hub("user/llama-joint")
    files = hub_calls[-1][2]["files"]
    assert sorted(files) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "joint_config.json"]
        + ["steer_config.json", "steer_model.safetensors"]
    )
