"""``push_to_hub`` for SteerModel and JointModel, through huggingface_hub's upload API.

``PushToHubMixin.push_to_hub`` saves with the model's own ``save_pretrained`` into a temporary
folder (every argument checked there, before anything on the Hub is touched), merges the repo's
README.md into the model card written there, then creates the repo if needed
(``HfApi.create_repo``) and uploads the folder in one commit (``HfApi.upload_folder``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .constants import LIBRARY_NAME, MODEL_CARD_NAME
from .hub import check_hub_kwargs, check_optional_text, library_version, saving_for
from .model_card import merge_model_card_file


class PushToHubMixin:
    """``push_to_hub`` for a model with a ``save_pretrained(save_directory, **kwargs)`` that
    writes steer_fast's adapter files and model card (SteerModel, JointModel)."""

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Save the adapters with ``save_pretrained`` (``save_kwargs``: its arguments, e.g.
        ``selected_adapters``) and upload them to the Hub repo ``repo_id`` in one commit.

        The repo is created if needed (``private``), ``revision`` names the branch to push to
        (created if needed); the repo's README.md, if it has one, is updated as a local one is
        (metadata merged, steer_fast's section rewritten). On a process other than the main one
        (``is_main_process=False``) nothing is saved or pushed.

        Returns:
            huggingface_hub's CommitInfo of the commit (None where nothing was pushed).

        Raises:
            ValueError: for a bad ``repo_id`` or argument, or a bad ``save_pretrained``
                argument: before anything is created or uploaded.
        """
        from huggingface_hub import HfApi
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ValueError(f"repo_id: {error}") from error
        for name, value in (
            ("commit_message", commit_message),
            ("commit_description", commit_description),
            ("revision", revision),
        ):
            check_optional_text(name, value)
        if private is not None and not isinstance(private, bool):
            raise ValueError(f"private must be True, False or None, got {private!r}")
        if not isinstance(create_pr, bool):
            raise ValueError(f"create_pr must be True or False, got {create_pr!r}")
        check_hub_kwargs({"token": token})
        api = HfApi(library_name=LIBRARY_NAME, library_version=library_version(), token=token)
        with tempfile.TemporaryDirectory(prefix="steer_fast-push-") as temporary:
            folder = Path(temporary) / "adapter"
            with saving_for(repo_id):
                self.save_pretrained(folder, **save_kwargs)
            if not folder.is_dir():
                return None
            _merge_repo_card(api, repo_id, revision, folder)
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision is not None and not revision.startswith("refs/pr/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {type(self).__name__} (steer_fast)",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


def _merge_repo_card(api: Any, repo_id: str, revision: str | None, folder: Path) -> None:
    """Put the repo's README.md (if it has one) in the folder's place, merged with the card
    ``save_pretrained`` wrote there."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = api.hf_hub_download(repo_id, MODEL_CARD_NAME, revision=revision)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return  # a new repo, branch or card
    source = f"repo_id: the README.md of {repo_id}"
    merge_model_card_file(folder / MODEL_CARD_NAME, Path(path).read_text(encoding="utf-8"), source)
