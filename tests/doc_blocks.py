"""The code blocks of README.md and docs/*.md, and the CPU stand-ins they run against.

``code_blocks(path)`` returns every fenced block of a markdown file with its language and how it
is tested, from an HTML comment on the line before the fence:

- no comment: run. The Python blocks of one file run in order in one namespace, as one script
  would (later blocks use what earlier ones built); shell blocks are checked command by command
  (``check_shell``); YAML blocks are parsed (``check_yaml``).
- ``<!-- doc-test: construct -->``: a block that needs what this machine lacks (GPUs, several
  processes): its imports run, every dotted name it uses from them resolves, and every config
  it builds from literals (TrainingArguments, LoraConfig, SteerConfig, ...) is built.
- ``<!-- doc-test: tests/<file>.py -->``: run by that test file instead (the README's offline
  quickstart, which loads a real model).

A block without a language (or ``text``) is output shown for a block before it: not run.

``stand_ins(monkeypatch)`` makes the snippets CPU-sized: a model name that is not a local path
loads a tiny random model of the same family (``tiny_models.tiny_causal_lm``) and a character
tokenizer; ``datasets.load_dataset`` of a hub dataset gives a few rows of the same columns;
every TrainingArguments (TRL's configs are TrainingArguments) trains two steps on the CPU with
small batches; ``"cuda"`` in a snippet runs on the CPU. Nothing else is replaced: steer_fast,
transformers, PEFT, TRL and the Trainer run as they are.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
DOCS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*doc-test:\s*(.+?)\s*-->\s*$")
OUTPUT_LANGUAGES = ("", "text", "console")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    mode: str  # "run", "construct", or the test file that runs it

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPOSITORY)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` (see the module docstring)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        language, start = fence.group(1), index
        marker = _MARKER.match(lines[index - 1]) if index > 0 else None
        index += 1
        body = []
        while index < len(lines) and not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        index += 1
        mode = marker.group(1) if marker else "run"
        blocks.append(Block(path, start + 1, language, "\n".join(body) + "\n", mode))
    return blocks


# ----------------------------------------------------------------------------------------------
# Stand-ins
# ----------------------------------------------------------------------------------------------

# Which tiny family stands in for a model name (the first keyword found in it, lower case).
FAMILY_KEYWORDS = (
    ("qwen3", "qwen3"),
    ("qwen", "qwen2"),
    ("mistral", "mistral"),
    ("gemma", "gemma3_text"),
    ("phi", "phi3"),
    ("gpt2", "gpt2"),
    ("olmo", "olmo2"),
)

# A few rows of each hub dataset the snippets load, with that dataset's columns.
_STORIES = [
    "Once upon a time a cat sat on a mat.",
    "The dog ran to the park and back.",
    "A bird sang a song in the old tree.",
    "The sun came up over the quiet hill.",
]
DATASETS = {
    "roneneldan/TinyStories": {"text": _STORIES * 2},
    "trl-lib/Capybara": {
        "messages": [
            [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
        ]
        * 8
    },
    "trl-lib/tldr": {"prompt": _STORIES * 2},
}


def family_for(name: str) -> str:
    lowered = name.lower()
    return next((family for key, family in FAMILY_KEYWORDS if key in lowered), "llama")


def is_local(name: object) -> bool:
    return isinstance(name, (str, Path)) and Path(name).exists()


def stand_ins(monkeypatch) -> None:
    """Install the CPU stand-ins of the module docstring (undone by ``monkeypatch``)."""
    import datasets
    import transformers

    from tiny_models import char_tokenizer, tiny_causal_lm

    model_loader = transformers.AutoModelForCausalLM.from_pretrained.__func__
    tokenizer_loader = transformers.AutoTokenizer.from_pretrained.__func__
    load_dataset = datasets.load_dataset

    def load_model(cls, name, *args, **kwargs):
        if is_local(name):
            return model_loader(cls, name, *args, **kwargs)
        dtype = kwargs.get("dtype", torch.float32)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        model = tiny_causal_lm(family_for(str(name)), dtype=dtype or torch.float32)
        model.config._name_or_path = str(name)
        model.name_or_path = str(name)
        return model

    def load_tokenizer(cls, name, *args, **kwargs):
        if is_local(name):
            return tokenizer_loader(cls, name, *args, **kwargs)
        tokenizer = char_tokenizer()
        # An instruct model's chat template, for the snippets that train on conversations.
        tokenizer.chat_template = (
            "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
        )
        return tokenizer

    def load_rows(name, *args, **kwargs):
        if name in DATASETS:
            return datasets.Dataset.from_dict(DATASETS[name])
        return load_dataset(name, *args, **kwargs)

    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", classmethod(load_model)
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(load_tokenizer))
    monkeypatch.setattr(datasets, "load_dataset", load_rows)

    post_init = transformers.TrainingArguments.__post_init__

    def small(self) -> None:
        self.max_steps = 2
        self.save_steps = 1
        self.logging_steps = 1
        self.per_device_train_batch_size = min(self.per_device_train_batch_size, 2)
        self.gradient_accumulation_steps = 1
        self.report_to = "none"
        self.disable_tqdm = True
        if not torch.cuda.is_available():
            self.use_cpu = True
            self.bf16 = self.fp16 = False
        if hasattr(self, "num_generations"):  # GRPO: completions per prompt
            self.num_generations = 2
            self.max_completion_length = 4
        if hasattr(self, "max_length") and isinstance(self.max_length, int):  # SFT
            self.max_length = min(self.max_length, 64)
        post_init(self)

    monkeypatch.setattr(transformers.TrainingArguments, "__post_init__", small)


def for_this_machine(code: str) -> str:
    """``code`` with its CUDA device moves made CPU ones when there is no GPU."""
    if torch.cuda.is_available():
        return code
    return code.replace('.to("cuda")', '.to("cpu")').replace(".cuda()", ".cpu()")


# ----------------------------------------------------------------------------------------------
# Constructing a block that cannot run here
# ----------------------------------------------------------------------------------------------

# Configs a construct-mode block builds, when their arguments are literals.
CONFIG_CLASSES = (
    "TrainingArguments",
    "SFTConfig",
    "GRPOConfig",
    "LoraConfig",
    "SteerConfig",
    "OrthogonalityConfig",
    "BitsAndBytesConfig",
)


def construct(block: Block) -> list[str]:
    """Run the imports of ``block``, resolve the dotted names it takes from them and build its
    literal configs; returns what failed (empty when everything resolved)."""
    tree = ast.parse(block.code)
    namespace: dict = {}
    failures = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), block.where, "exec"), namespace)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = []
            current = node
            while isinstance(current, ast.Attribute):
                chain.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name) and current.id in namespace:
                value = namespace[current.id]
                for attribute in reversed(chain):
                    if not hasattr(value, attribute):
                        failures.append(f"{current.id}.{'.'.join(reversed(chain))}")
                        break
                    value = getattr(value, attribute)
                    if (
                        not isinstance(value, type)
                        and not callable(value)
                        and not hasattr(value, "__dict__")
                    ):
                        break
        if isinstance(node, ast.Call):
            name = (
                node.func.attr
                if isinstance(node.func, ast.Attribute)
                else getattr(node.func, "id", None)
            )
            if name in CONFIG_CLASSES and (config_class := _resolve(node.func, namespace)):
                try:
                    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
                    args = [ast.literal_eval(a) for a in node.args]
                except ValueError:
                    continue  # not all literals: built where it runs
                if name in ("TrainingArguments", "SFTConfig", "GRPOConfig"):
                    kwargs.setdefault("output_dir", "doc-test")
                    kwargs["use_cpu"] = not torch.cuda.is_available()
                    if kwargs["use_cpu"]:
                        kwargs["bf16"] = False
                try:
                    config_class(*args, **kwargs)
                except Exception as error:  # the config is wrong: that is what is tested
                    failures.append(f"{name}(...) at line {node.lineno}: {error}")
    return failures


def _resolve(node: ast.expr, namespace: dict):
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        parent = _resolve(node.value, namespace)
        return getattr(parent, node.attr, None) if parent is not None else None
    return None


# ----------------------------------------------------------------------------------------------
# Shell and YAML blocks
# ----------------------------------------------------------------------------------------------

# Commands a shell block may run, and how each is checked.
_PROGRAMS = {"python3", "python", "pip", "pytest", "torchrun", "accelerate", "bash", "steer-fast"}


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: lines joined at backslashes, comments dropped, ``&&``
    chains split; a leading ``.venv/bin/`` is dropped from the program."""
    text = re.sub(r"\\\n", " ", code)
    commands = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for part in line.split("&&"):
            words = shlex.split(part)
            if words:
                words[0] = words[0].removeprefix(".venv/bin/")
                commands.append(words)
    return commands


def check_shell(block: Block) -> list[str]:
    """What is wrong with the commands of a shell block: an unknown program, a script or a path
    that does not exist, ``steer-fast`` options its parser refuses."""
    failures = []
    for words in shell_commands(block.code):
        program = words[0]
        if program == ".":
            continue  # ". .venv/bin/activate"
        if program not in _PROGRAMS:
            failures.append(f"unknown program {program!r} in {' '.join(words)!r}")
            continue
        if program == "steer-fast":
            from steer_fast_bench.cli import build_parser

            try:
                build_parser().parse_args(words[1:])
            except SystemExit:
                failures.append(f"steer-fast refuses {' '.join(words[1:])!r}")
            continue
        for word in words[1:]:
            local = word.endswith((".py", ".sh")) or word.startswith(("bench/", "tests/"))
            if local and not word.startswith("-") and "train.py" not in word:
                if not (REPOSITORY / word).exists():
                    failures.append(f"{word} does not exist")
        if program == "pip" and "-e" in words:
            for word in words[words.index("-e") + 1 :]:
                target = word.split("[")[0].strip("\"'")
                if not word.startswith("-") and not (REPOSITORY / target).exists():
                    failures.append(f"pip -e {word}: no such folder")
    return failures


def check_yaml(block: Block) -> list[str]:
    """A YAML block parses, and an accelerate config's keys are accelerate's."""
    import yaml

    data = yaml.safe_load(block.code)
    if not isinstance(data, dict):
        return [f"{block.where}: not a YAML mapping"]
    if "distributed_type" not in data:
        return []
    import dataclasses

    from accelerate.commands.config.config_args import ClusterConfig

    known = {field.name for field in dataclasses.fields(ClusterConfig)}
    return [f"unknown accelerate config key {key!r}" for key in data if key not in known]
