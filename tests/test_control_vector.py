"""llama.cpp control vectors: export_control_vector writes what llama.cpp's loader reads (keys,
f32 direction.<layer> tensors, the scale folded in, layer N added to decoder layer N's output),
load_control_vector reads them back (and repeng's files) as a rank-0 adapter that gives the
same logits, trains further and runs in mixed batches; bad input changes nothing."""

import gguf
import numpy as np
import pytest
import torch

import steer_fast
from steer_fast import SteerConfig, get_steer_model, load_control_vector
from steer_fast.injection import SteeredBlock

from tiny_models import HIDDEN_SIZE, decoder_layers, random_input_ids, tiny_causal_lm

NUM_LAYERS = 3
INPUT_IDS = random_input_ids(3, 6)
VECTOR = SteerConfig(rank=0, layers=[1, 2], scale=0.5, backend="torch")


def base():
    return tiny_causal_lm("llama", num_layers=NUM_LAYERS)


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, **kwargs).logits


def randomize(model, adapter_name="default", seed=0, layers=None):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, _, module in model._all_adapters(adapter_name):
            for parameter in module.parameters() if layers is None or index in layers else ():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def steered_with_vector(config=VECTOR, seed=0):
    model = get_steer_model(base(), config)
    randomize(model, seed=seed)
    return model


def is_steered(model):
    return any(isinstance(module, SteeredBlock) for module in model.modules())


def with_directions_added(model, directions, strength=1.0):
    """``model`` with each direction added to its layer's output, as llama.cpp's build_cvec
    adds tensors[il] to layer il's output (and repeng's ControlModule to layers[il]'s)."""
    layers = decoder_layers(model, "llama")
    for index, values in directions.items():
        direction = torch.as_tensor(values)

        def hook(module, args, output, direction=direction):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + strength * direction.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        layers[index].register_forward_hook(hook)
    return model


def write_gguf(path, architecture, tensors, model_hint="llama", count_type="uint32"):
    """A GGUF file written as repeng's export_gguf writes one."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_string(f"{architecture}.model_hint", model_hint)
    getattr(writer, f"add_{count_type}")(f"{architecture}.layer_count", len(tensors))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_file_holds_what_llama_cpp_reads(tmp_path):
    model = steered_with_vector()
    model.export_control_vector(tmp_path / "vector.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["vector.gguf"]  # no temporary file left
    reader = gguf.GGUFReader(tmp_path / "vector.gguf")
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    layer_count = reader.get_field("controlvector.layer_count")
    assert layer_count.contents() == 2
    assert layer_count.types == [gguf.GGUFValueType.UINT32]  # as repeng writes it
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]
    adapters = model.get_adapters()
    for index in (1, 2):
        tensor = tensors[f"direction.{index}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(tensor.shape) == [HIDDEN_SIZE]
        expected = (0.5 * adapters[index].vector.detach()).numpy()  # the scale folded in
        np.testing.assert_array_equal(tensor.data, expected)
    # llama.cpp adds direction N to decoder layer N's output, at every position.
    directions = {index: np.array(tensors[f"direction.{index}"].data) for index in (1, 2)}
    reference = with_directions_added(base(), directions)
    torch.testing.assert_close(logits(reference), logits(model), rtol=1e-6, atol=1e-6)


def test_a_round_trip_gives_the_same_logits_trains_further_and_runs_mixed(tmp_path):
    model = steered_with_vector()
    model.add_adapter("other", SteerConfig(rank=0, layers=[2], scale=2.0, backend="torch"))
    randomize(model, "other", seed=1)
    model.export_control_vector(tmp_path / "default.gguf")
    model.export_control_vector(tmp_path / "other.gguf", adapter_name="other")

    loaded = load_control_vector(base(), tmp_path / "default.gguf", backend="torch")
    assert loaded.list_adapters() == ["default"] and not loaded.training
    assert loaded.steer_config.rank == 0 and loaded.steer_config.layers == (1, 2)
    assert sorted(loaded.steering_paths()) == [1, 2]  # layer 0 unsteered
    assert not any(p.requires_grad for p in loaded.parameters())
    expected = logits(model)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-6)

    loaded.load_control_vector(tmp_path / "other.gguf", "other", is_trainable=True)
    base_logits = logits(base())
    mixed = logits(loaded, adapter_names=["other", "__base__", "default"])
    torch.testing.assert_close(
        mixed[0], logits(model, adapter_names=["other"] * 3)[0], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(mixed[1], base_logits[1], rtol=0, atol=0)
    torch.testing.assert_close(mixed[2], expected[2], rtol=0, atol=1e-6)

    # "other" trains further (and only it: "default" was loaded frozen), from its own rows.
    trainable = [p for p in loaded.parameters() if p.requires_grad]
    assert len(trainable) == 1
    before = trainable[0].detach().clone()
    optimizer = torch.optim.Adam(trainable, lr=5e-2)
    loaded.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = loaded(input_ids=INPUT_IDS, labels=INPUT_IDS, adapter_names=["other"] * 3).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and not torch.equal(trainable[0], before)
    loaded.export_control_vector(tmp_path / "tuned.gguf", adapter_name="other")
    tuned = gguf.GGUFReader(tmp_path / "tuned.gguf").tensors
    assert [t.name for t in tuned] == ["direction.2"]
    # Loaded at scale 1, its vector is the file's direction (scale 2 folded in).
    assert loaded.steer_configs["other"].scale == 1.0
    np.testing.assert_array_equal(tuned[0].data, trainable[0].detach().numpy())


def test_a_repeng_file_loads_with_layer_0_unsteered(tmp_path):
    generator = np.random.default_rng(0)
    # repeng's default layers: range(-1, -num_hidden_layers, -1), i.e. every layer but 0.
    layers = [NUM_LAYERS + i for i in range(-1, -NUM_LAYERS, -1)]
    directions = {
        index: (v / np.linalg.norm(v)).astype(np.float32)
        for index in layers
        for v in [generator.standard_normal(HIDDEN_SIZE)]
    }
    write_gguf(
        tmp_path / "repeng.gguf", "controlvector", {f"direction.{i}": directions[i] for i in layers}
    )
    # repeng's set_control(vector, coeff) adds coeff * direction to each layer's output.
    model = steer_fast.load_control_vector(base(), tmp_path / "repeng.gguf", scale=1.5)
    assert sorted(model.steering_paths()) == [1, 2]
    reference = with_directions_added(base(), directions, strength=1.5)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-6, atol=1e-6)
    # llama.cpp's cvector-generator writes layer_count as int32, and float64 directions load too.
    write_gguf(
        tmp_path / "int32.gguf",
        "controlvector",
        {"direction.2": directions[2].astype(np.float64)},
        count_type="int32",
    )
    model.load_control_vector(tmp_path / "int32.gguf", "generator")
    assert model.steer_configs["generator"].layers == (2,)


@pytest.mark.parametrize(
    "config, match",
    [
        (SteerConfig(rank=4, backend="torch"), "rank 4"),
        (SteerConfig(rank=0, site="attn", backend="torch"), "site"),
        (SteerConfig(rank=0, backend="torch"), "layer 0 with a non-zero vector"),
    ],
)
def test_an_adapter_a_control_vector_cannot_express_is_refused(tmp_path, config, match):
    model = steered_with_vector(config)
    with pytest.raises(ValueError, match=rf"adapter_name: .*{match}"):
        model.export_control_vector(tmp_path / "vector.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_zero_vector_at_layer_0_is_left_out_and_bad_arguments_write_nothing(tmp_path):
    model = get_steer_model(base(), SteerConfig(rank=0, backend="torch"))
    randomize(model, layers=[1, 2])
    model.export_control_vector(tmp_path / "vector.gguf", model_hint="my-llama")
    reader = gguf.GGUFReader(tmp_path / "vector.gguf")
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2"]
    assert reader.get_field("controlvector.model_hint").contents() == "my-llama"
    with pytest.raises(ValueError, match="adapter_name: no adapter 'nope'"):
        model.export_control_vector(tmp_path / "other.gguf", adapter_name="nope")
    with pytest.raises(ValueError, match="path: .* is a directory"):
        model.export_control_vector(tmp_path)
    with pytest.raises(ValueError, match="model_hint"):
        model.export_control_vector(tmp_path / "other.gguf", model_hint=3)
    assert [p.name for p in tmp_path.iterdir()] == ["vector.gguf"]


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    model = steered_with_vector()
    path = tmp_path / "vector.gguf"
    path.write_bytes(b"previous")

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        model.export_control_vector(path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["vector.gguf"]
    monkeypatch.undo()
    model.export_control_vector(path)
    assert gguf.GGUFReader(path).get_field("general.architecture").contents() == "controlvector"


def bad_files(tmp_path):
    vector = np.ones(HIDDEN_SIZE, np.float32)
    write_gguf(tmp_path / "wide.gguf", "controlvector", {"direction.1": np.ones(16, np.float32)})
    write_gguf(tmp_path / "deep.gguf", "controlvector", {"direction.3": vector})
    write_gguf(tmp_path / "llama.gguf", "llama", {"token_embd.weight": vector})
    write_gguf(tmp_path / "names.gguf", "controlvector", {"steer.1": vector})
    write_gguf(
        tmp_path / "matrix.gguf", "controlvector", {"direction.1": np.ones((2, 32), np.float32)}
    )
    write_gguf(tmp_path / "empty.gguf", "controlvector", {})
    (tmp_path / "text.gguf").write_text("not a gguf file")
    return {
        "wide.gguf": "hidden size 16, but the model's hidden size is 32",
        "deep.gguf": r"layers \[3\], but the model has 3 decoder layers",
        "llama.gguf": "is not a control vector: its general.architecture is 'llama'",
        "names.gguf": "holds a tensor 'steer.1'",
        "matrix.gguf": "a direction is a 1-D float vector",
        "empty.gguf": "holds no direction",
        "text.gguf": "is not a GGUF file",
        "missing.gguf": "is not a file",
    }


def test_a_bad_file_changes_nothing(tmp_path):
    model = base()
    steered = steered_with_vector()
    before = logits(steered)
    for name, match in bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=rf"path: .*{name}.*{match}"):
            load_control_vector(model, tmp_path / name)
        assert not is_steered(model)
        with pytest.raises(ValueError, match=rf"path: .*{name}.*{match}"):
            steered.load_control_vector(tmp_path / name, "bad")
        assert steered.list_adapters() == ["default"]
    torch.testing.assert_close(logits(steered), before, rtol=0, atol=0)


def test_adapter_names_are_checked_before_anything_changes(tmp_path):
    steered_with_vector().export_control_vector(tmp_path / "vector.gguf")
    model = base()
    with pytest.raises(ValueError, match="adapter_name: a control vector loaded onto a model"):
        load_control_vector(model, tmp_path / "vector.gguf", adapter_name="happy")
    assert not is_steered(model)
    steered = steered_with_vector()
    with pytest.raises(ValueError, match="adapter_name: name the adapter"):
        load_control_vector(steered, tmp_path / "vector.gguf")
    with pytest.raises(ValueError, match="adapter_name: an adapter 'default' is loaded already"):
        steered.load_control_vector(tmp_path / "vector.gguf", "default")
    with pytest.raises(ValueError, match="scale"):
        steered.load_control_vector(tmp_path / "vector.gguf", "happy", scale=float("nan"))
    with pytest.raises(ValueError, match="is_trainable"):
        steered.load_control_vector(tmp_path / "vector.gguf", "happy", is_trainable="yes")
    assert steered.list_adapters() == ["default"]
    assert load_control_vector(steered, tmp_path / "vector.gguf", "happy") is steered
    assert steered.list_adapters() == ["default", "happy"]
