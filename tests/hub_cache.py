"""A Hugging Face Hub cache on disk, laid out as huggingface_hub's client lays it out when it
downloads a repo (file_download.py, _snapshot_download.py, _tree_cache.py), for offline tests:

    {cache}/models--{user}--{name}/
        blobs/{git sha1, or sha256 for LFS files}     the files' bytes
        refs/main                                     the commit hash (no newline)
        snapshots/{commit}/{path}                     relative symlinks to ../../blobs/...
        trees/{commit}.json                           the commit's tree listing

    cache = offline_hub(tmp_path, monkeypatch)        # HF_HUB_CACHE there, HF_HUB_OFFLINE=1
    commit = publish(cache, "user/name", folder)      # folder's files as the repo's main

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: ``offline_hub`` sets the
environment variables and the values huggingface_hub read from them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import huggingface_hub.constants
from huggingface_hub.file_download import repo_folder_name

# Files the Hub stores with LFS (as its default .gitattributes does).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def offline_hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hub cache under ``tmp_path``, made the one huggingface_hub and transformers
    use, with HF_HUB_OFFLINE=1; returns its folder."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def publish(cache: Path, repo_id: str, folder: Path, commit: str | None = None) -> str:
    """Put every file under ``folder`` into ``cache`` as repo ``repo_id``'s main branch at
    ``commit`` (default: a hash of the files); returns the commit hash."""
    files = {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    if commit is None:
        digest = hashlib.sha1(repo_id.encode())
        for name, data in files.items():
            digest.update(name.encode() + b"\0" + data)
        commit = digest.hexdigest()
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    tree = {}
    for name, data in files.items():
        entry = {"size": len(data)}
        if name.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            pointer += f"size {len(data)}\n"
            entry.update(blob_id=_git_blob_id(pointer.encode()), lfs_sha256=sha256)
            entry["lfs_size"] = len(data)
            blob = sha256
        else:
            blob = entry["blob_id"] = _git_blob_id(data)
        tree[name] = entry
        (storage / "blobs" / blob).write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(storage / "blobs" / blob, link.parent))
    (storage / "refs" / "main").write_text(commit)
    (storage / "trees").mkdir(exist_ok=True)
    listing = {"format_version": 1, "files": tree}
    (storage / "trees" / f"{commit}.json").write_text(json.dumps(listing, indent=1))
    return commit


def cache_files(cache: Path) -> dict[str, bytes]:
    """Every file (links followed) and link target under ``cache``, to check nothing changed."""
    found = {}
    for path in sorted(cache.rglob("*")):
        key = str(path.relative_to(cache))
        if path.is_symlink():
            found[key] = os.readlink(path).encode()
        elif path.is_file():
            found[key] = path.read_bytes()
    return found
