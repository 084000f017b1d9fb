"""Adapters on the Hugging Face Hub: a repo id wherever a saved folder is expected, through
huggingface_hub (pushing is ``steer_fast.push``).

Resolution (``resolve_adapter``). A local folder that exists always wins; a path object is
always local. Any other string that is a valid repo id ("user/name") is fetched with
huggingface_hub's ``snapshot_download``, only the adapter files (``HUB_ADAPTER_FILES``, at the
repo's top or in ``subfolder``), into the Hub cache (``HF_HUB_CACHE`` / ``HF_HOME``, or
``cache_dir``), so that ``HF_HUB_OFFLINE=1`` and ``local_files_only=True`` load a cached
snapshot without any request. A Trainer checkpoint (model.safetensors) is read from local
folders only: a repo's model.safetensors may be a whole model.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

from .constants import HUB_ADAPTER_FILES, LIBRARY_NAME


class HubKwargs(TypedDict, total=False):
    """Where to find an adapter given as a Hub repo id (ignored for a local folder, but
    ``subfolder``).

    Attributes:
        revision: the repo's branch, tag or commit (default: its main branch).
        subfolder: the folder inside the repo (or the local folder) holding the adapter, as in
            PEFT: a named adapter's subfolder of a ``save_pretrained`` folder.
        token: the Hub token (huggingface_hub's ``token``: a string, True for the saved login,
            False or None).
        cache_dir: the Hub cache to use instead of ``HF_HUB_CACHE``.
        local_files_only: use the cache only, as ``HF_HUB_OFFLINE=1`` does.
    """

    revision: str | None
    subfolder: str | None
    token: bool | str | None
    cache_dir: str | os.PathLike | None
    local_files_only: bool


HUB_KWARGS: tuple[str, ...] = tuple(HubKwargs.__annotations__)

# The repo push_to_hub is saving for, which the model card's usage example names.
_PUSHING_TO: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "steer_fast_pushing_to", default=None
)


def pushing_to() -> str | None:
    """The repo id ``push_to_hub`` is saving for at the moment, or None."""
    return _PUSHING_TO.get()


@contextlib.contextmanager
def saving_for(repo_id: str) -> Iterator[None]:
    """Within it, ``pushing_to()`` is ``repo_id``."""
    token = _PUSHING_TO.set(repo_id)
    try:
        yield
    finally:
        _PUSHING_TO.reset(token)


def library_version() -> str | None:
    """steer_fast's installed version (for huggingface_hub's user agent and the model card)."""
    try:
        return importlib.metadata.version(LIBRARY_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_hub_id(name: object) -> bool:
    """Whether ``name`` is a string that reads as a Hub repo id and is not a local path."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or name[0] in ".~":
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def check_optional_text(name: str, value: object) -> None:
    """ValueError naming ``name`` unless ``value`` is None or a non-empty string."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be None or a non-empty string, got {value!r}")


def check_hub_kwargs(hub_kwargs: dict[str, Any]) -> HubKwargs:
    """``hub_kwargs`` if they are ``HubKwargs``; ValueError naming the first bad one."""
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise ValueError(f"unknown keyword arguments {unknown}; the Hub's are {list(HUB_KWARGS)}")
    check_optional_text("revision", hub_kwargs.get("revision"))
    subfolder = hub_kwargs.get("subfolder")
    check_optional_text("subfolder", subfolder)
    if subfolder is not None and (
        os.path.isabs(subfolder) or ".." in Path(subfolder).parts or "\\" in subfolder
    ):
        raise ValueError(f"subfolder must be a relative path inside the repo, got {subfolder!r}")
    token = hub_kwargs.get("token")
    if token is not None and not isinstance(token, (bool, str)):
        raise ValueError(f"token must be a string, True, False or None, got {type(token).__name__}")
    cache_dir = hub_kwargs.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f"cache_dir must be a path or None, got {cache_dir!r}")
    if not isinstance(hub_kwargs.get("local_files_only", False), bool):
        raise ValueError(
            f"local_files_only must be True or False, got {hub_kwargs['local_files_only']!r}"
        )
    return HubKwargs(**hub_kwargs)


def resolve_adapter(
    model_id: str | os.PathLike, argument: str = "model_id", **hub_kwargs: Any
) -> Path:
    """The local folder of the adapter ``model_id`` names: ``model_id`` itself (with
    ``subfolder``) when it is a local folder, a path object or no valid repo id; otherwise the
    folder of its Hub snapshot in the cache, downloaded (only the adapter files) unless cached
    and offline. ``hub_kwargs``: ``HubKwargs``.

    Raises:
        ValueError: naming ``argument`` for a repo that cannot be had (offline and not cached,
            not found, a missing revision) or that holds no steer_fast adapter, and for bad
            ``hub_kwargs``. Nothing is written but the Hub cache's own files.
    """
    options = check_hub_kwargs(hub_kwargs)
    subfolder = options.get("subfolder")
    if isinstance(model_id, os.PathLike) or not is_hub_id(model_id):
        if not isinstance(model_id, (str, os.PathLike)):
            raise ValueError(
                f"{argument} must be a folder or a Hub repo id, got {type(model_id).__name__}"
            )
        directory = Path(model_id)
        return directory / subfolder if subfolder else directory
    directory = _download(model_id, argument, options)
    directory = directory / subfolder if subfolder else directory
    if not any((directory / name).is_file() for name in HUB_ADAPTER_FILES):
        where = f" in subfolder {subfolder!r}" if subfolder else ""
        raise ValueError(
            f"{argument}: the Hub repo {model_id!r} holds no steer_fast adapter{where} (none of "
            f"{list(HUB_ADAPTER_FILES)}); a Trainer checkpoint loads from a local folder only"
        )
    return directory


def _download(repo_id: str, argument: str, options: HubKwargs) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    subfolder, revision = options.get("subfolder"), options.get("revision")
    patterns = [f"{subfolder}/{name}" if subfolder else name for name in HUB_ADAPTER_FILES]
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=options.get("cache_dir"),
                token=options.get("token"),
                local_files_only=options.get("local_files_only", False),
                allow_patterns=patterns,
                library_name=LIBRARY_NAME,
                library_version=library_version(),
            )
        )
    except LocalEntryNotFoundError as error:
        if options.get("local_files_only"):
            reason = "local_files_only=True"
        elif constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
        else:
            reason = "the Hub cannot be reached"
        cache = options.get("cache_dir") or constants.HF_HUB_CACHE
        raise ValueError(
            f"{argument}: {repo_id!r} is not a local folder, and the Hub repo{at} is not (fully) "
            f"in the cache {cache} while {reason}: download it once online, or pass a local "
            f"folder ({error})"
        ) from error
    except RevisionNotFoundError as error:
        raise ValueError(
            f"{argument}: the Hub repo {repo_id!r} has no revision {revision!r}"
        ) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"{argument}: {repo_id!r} is neither a local folder nor a Hub repo this token can "
            f"read (private or gated repos need token=): {error}"
        ) from error
    except OSError as error:  # huggingface_hub's HTTP errors are OSErrors
        raise ValueError(
            f"{argument}: the Hub repo {repo_id!r}{at} cannot be read: {error}"
        ) from error
