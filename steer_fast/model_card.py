"""The model card ``save_pretrained`` writes beside the adapter files: README.md, made with
huggingface_hub's ``ModelCard`` / ``ModelCardData``, as PEFT's ``create_or_update_model_card``
writes its own.

The card's metadata (the YAML block the Hub reads) names the base model (``base_model``, when
it is a Hub id), ``library_name: steer_fast``, the tags (``MODEL_CARD_TAGS``, the base model's
own ``model_tags``, PEFT's ``base_model:adapter:<base>``, and "lora", "peft" for a JointModel)
and ``pipeline_tag: text-generation`` for a causal LM. Its text has one section steer_fast
owns, between ``CARD_BEGIN`` and ``CARD_END``: the method and the paper, a table of the saved
adapters' configs (and the LoRA part of a JointModel), how to load it, and the versions.

A README.md already in the folder is updated, not replaced: its metadata is merged (tags joined,
a ``pipeline_tag`` of its own kept) and only steer_fast's section of its text is rewritten (or
appended, the first time). The card goes into the staging directory of the atomic save
(``saving.atomic``), so a failed save leaves the old README.md as it was.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import SteerConfig, dtype_name
from .constants import (
    DEFAULT_ADAPTER_NAME,
    JOINT_MODEL_CARD_TAGS,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    MODEL_CARD_TAGS,
    PAPER_ARXIV_ID,
    PAPER_TITLE,
)
from .hub import is_hub_id, pushing_to
from .saving.atomic import save_directory_atomically

# steer_fast's section of the card's text; what lies outside it is the author's.
CARD_BEGIN = "<!-- steer_fast model card: begin (rewritten by save_pretrained) -->"
CARD_END = "<!-- steer_fast model card: end -->"
TEXT_GENERATION = "text-generation"


@dataclass(frozen=True)
class CardContents:
    """What a model card says about a save.

    Attributes:
        adapters: the saved steering adapters' configs by name ("default" at the folder's top,
            the others in subfolders of their names).
        pipeline_tag: "text-generation" for a causal LM, None when unknown.
        model_tags: the base model's own tags (transformers' ``model_tags``).
        lora: a JointModel's LoRA settings to show (None for a SteerModel).
        orthogonality: a JointModel's orthogonality settings to show.
        versions: distribution -> version, for the card's "Framework versions".
    """

    adapters: dict[str, SteerConfig]
    pipeline_tag: str | None = None
    model_tags: tuple[str, ...] = ()
    lora: dict[str, Any] | None = None
    orthogonality: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        """The base model the adapters record (the default one's, else the first's)."""
        configs = list(self.adapters.values())
        config = self.adapters.get(DEFAULT_ADAPTER_NAME, configs[0] if configs else None)
        return None if config is None else config.base_model_name_or_path

    @property
    def revision(self) -> str | None:
        """The base model's revision, recorded as ``base_model``."""
        configs = list(self.adapters.values())
        config = self.adapters.get(DEFAULT_ADAPTER_NAME, configs[0] if configs else None)
        return None if config is None else config.revision


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def card_contents(
    model: nn.Module,
    adapters: dict[str, SteerConfig],
    lora: dict[str, Any] | None = None,
    orthogonality: dict[str, Any] | None = None,
) -> CardContents:
    """The card of ``adapters`` saved from a steered transformers ``model`` (a JointModel's
    ``lora`` and ``orthogonality`` settings too)."""
    tags = getattr(model, "model_tags", None)
    distributions = ["steer_fast", "transformers", "torch"] + (["peft"] if lora else [])
    versions = {name: _version(name) for name in distributions}
    return CardContents(
        adapters=dict(adapters),
        pipeline_tag=pipeline_tag(model),
        model_tags=tuple(tag for tag in tags or () if isinstance(tag, str)),
        lora=lora,
        orthogonality=orthogonality,
        versions={name: version for name, version in versions.items() if version},
    )


def pipeline_tag(model: nn.Module) -> str | None:
    """The pipeline tag "text-generation" when ``model`` is of a causal-LM class transformers'
    ``AutoModelForCausalLM`` maps to, None otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return TEXT_GENERATION if type(model).__name__ in names else None


# ----------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------


def _layers(config: SteerConfig) -> str:
    if config.layers is None:
        return "all" if config.num_layers is None else f"all {config.num_layers}"
    return ", ".join(str(index) for index in config.layers)


def _adapter_rows(adapters: dict[str, SteerConfig]) -> list[str]:
    rows = [
        "| adapter | folder | rank | activation | sites | layers | scale | bias | dtype |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, config in adapters.items():
        folder = "." if name == DEFAULT_ADAPTER_NAME else f"{name}/"
        kind = "vector" if config.rank == 0 else str(config.rank)
        dtype = "the model's" if config.dtype is None else dtype_name(config.dtype)
        rows.append(
            f"| {name} | {folder} | {kind} | {config.activation} | {', '.join(config.site)} | "
            f"{_layers(config)} | {config.scale:g} | {'yes' if config.bias else 'no'} | {dtype} |"
        )
    return rows


def _section(contents: CardContents, model_id: str) -> str:
    base = contents.base_model
    if base is None:
        base_text = "a base model that was not recorded"
    elif is_hub_id(base):
        base_text = f"[`{base}`](https://huggingface.co/{base})"
    else:
        base_text = f"`{base}`"
    if contents.revision:
        base_text += f" (revision `{contents.revision}`)"
    joint = contents.lora is not None
    lines = [
        CARD_BEGIN,
        "",
        f"# {'LoRA + post-block steering' if joint else 'Post-block steering'} adapter",
        "",
        f"Activation-steering adapters for {base_text}, saved by steer_fast. After each "
        "steered decoder layer, its output h (after the skip connection) becomes",
        "",
        "    out = h + s * (U phi(D h + b_d) + b_u)      D: rank x d, U: d x rank",
        "",
        "with the base model frozen (rank 0: a steering vector, out = h + s b): post-block "
        f"steering, from *{PAPER_TITLE}* "
        f"([arXiv:{PAPER_ARXIV_ID}](https://arxiv.org/abs/{PAPER_ARXIV_ID})).",
        "",
        "## Adapters",
        "",
        *_adapter_rows(contents.adapters),
    ]
    if joint:
        lora = ", ".join(f"{key}={value}" for key, value in contents.lora.items())
        lines += [
            "",
            "The LoRA part (PEFT's `adapter_config.json` and `adapter_model.safetensors`, which "
            f"`peft.PeftModel.from_pretrained` loads alone): {lora}.",
        ]
        if contents.orthogonality:
            settings = ", ".join(
                f"{key}={value}"
                for key, value in contents.orthogonality.items()
                if value is not None
            )
            lines.append(f"The orthogonality constraint between the two parts: {settings}.")
    others = [name for name in contents.adapters if name != DEFAULT_ADAPTER_NAME]
    # Without a top-level adapter, the first subfolder's is loaded first.
    first = "" if DEFAULT_ADAPTER_NAME in contents.adapters else f', subfolder="{others.pop(0)}"'
    usage = [
        "from steer_fast import AutoSteerModelForCausalLM",
        "",
        "# the base model recorded in steer_config.json, then the adapter on it",
        f'model = AutoSteerModelForCausalLM.from_pretrained("{model_id}"{first})',
    ]
    usage += [f'model.load_adapter("{model_id}", "{name}", subfolder="{name}")' for name in others]
    lines += ["", "## Usage", "", "```python", *usage, "```"]
    if contents.versions:
        lines += ["", "### Framework versions", ""]
        lines += [f"- {name} {version}" for name, version in contents.versions.items()]
    return "\n".join([*lines, "", CARD_END])


def _tags(contents: CardContents) -> set[str]:
    tags = {*MODEL_CARD_TAGS, *contents.model_tags}
    if contents.lora is not None:
        tags.update(JOINT_MODEL_CARD_TAGS)
    if is_hub_id(contents.base_model):
        tags.add(f"base_model:adapter:{contents.base_model}")
    return tags


def _parse(text: str, source: str) -> Any:
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(
            f"{source} has a metadata block that is not a valid model card ({error}); fix or "
            "remove it"
        ) from error


def read_model_card(directory: Path, argument: str = "save_directory") -> Any:
    """The ModelCard of ``directory``'s README.md, or None where it has none.

    Raises:
        ValueError: naming ``argument`` if the README is not text or its metadata block is not
            valid YAML.
    """
    path = directory / MODEL_CARD_NAME
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{argument}: {path} is not UTF-8 text ({error})") from error
    return _parse(text, f"{argument}: {path}")


def new_model_card(contents: CardContents, model_id: str) -> Any:
    """The ModelCard of a save of ``contents`` that ``model_id`` (a repo id or a folder) loads
    from."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=contents.base_model if is_hub_id(contents.base_model) else None,
        library_name=LIBRARY_NAME,
        pipeline_tag=contents.pipeline_tag,
        tags=sorted(_tags(contents)),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_section(contents, model_id)}\n")


def merge_model_cards(existing: Any, ours: Any) -> Any:
    """``existing`` (a ModelCard, the author's) updated with ``ours`` (``new_model_card``): our
    library_name, the tags of both, its own pipeline_tag if it has one, our base_model if we
    know it, and steer_fast's section of its text replaced (or appended)."""
    data = existing.data
    data.library_name = ours.data.library_name
    data.tags = sorted(set(data.tags or []) | set(ours.data.tags or []))
    if not data.pipeline_tag and ours.data.pipeline_tag:
        data.pipeline_tag = ours.data.pipeline_tag
    if ours.data.base_model:
        data.base_model = ours.data.base_model
    section = ours.text[ours.text.find(CARD_BEGIN) : ours.text.find(CARD_END) + len(CARD_END)]
    text = existing.text
    begin, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if begin != -1 and end > begin:
        existing.text = text[:begin] + section + text[end + len(CARD_END) :]
    else:
        text = text.strip("\n")
        existing.text = f"\n{section}\n" if not text else f"{text}\n\n{section}\n"
    return existing


def merge_model_card_file(
    path: Path, existing_text: str, source: str = "the repo's README.md"
) -> None:
    """Rewrite the card at ``path`` (ours) as ``existing_text`` (another card, e.g. the Hub
    repo's) merged with it (``merge_model_cards``).

    Raises:
        ValueError: naming ``source`` if ``existing_text`` has invalid metadata.
    """
    ours = _parse(path.read_text(encoding="utf-8"), str(path))
    merge_model_cards(_parse(existing_text, source), ours).save(path)


def save_with_model_card(
    save_directory: str | os.PathLike,
    write: Callable[[Path], None],
    written: Iterable[str],
    contents: CardContents,
) -> None:
    """``saving.atomic.save_directory_atomically(save_directory, write, written)``, with the
    model card of ``contents`` written (or an existing README.md updated) into the new
    directory.

    Raises:
        ValueError: if an existing README.md there has invalid metadata (nothing is written).
    """
    target = Path(save_directory)
    existing = read_model_card(target) if target.is_dir() else None
    card = new_model_card(contents, pushing_to() or os.fspath(save_directory))
    if existing is not None:
        card = merge_model_cards(existing, card)

    def write_with_card(staging: Path) -> None:
        write(staging)
        card.save(staging / MODEL_CARD_NAME)

    save_directory_atomically(save_directory, write_with_card, (*written, MODEL_CARD_NAME))
