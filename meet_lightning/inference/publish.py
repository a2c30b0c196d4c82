"""Publish an export to the Hugging Face Hub (``python -m meet_lightning push``).

Everything is checked before anything is sent: the folder is an export, its model card's front matter parses,
neither the card nor the export's JSON files hold an absolute local path (home folders and user names stay on
this machine), the session is online and has a token. The upload is one Hub commit (``upload_folder``): the
repository holds all of the export or none of it. A repository this call created is deleted again when the
upload fails, so a failed push leaves nothing of ours behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, get_token, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError

from meet_lightning.errors import ConfigError, MeetError
from meet_lightning.inference.export import read_schema
from meet_lightning.names import local_paths, local_paths_in_text

VOCABULARY_FILES = frozenset({"tokenizer.json", "vocab.json"})
"""JSON files that hold token text, not settings: a token such as ``/usr`` is not a path to refuse."""


class PublishError(MeetError):
    """The Hub refused or could not be reached (exit code 2: the user can fix it)."""


def check_export_card(folder: Path) -> ModelCard:
    """The export's model card, parsed; ConfigError when it is missing or its front matter lacks Hub fields."""
    card_file = folder / "README.md"
    if not card_file.is_file():
        raise ConfigError(f"{card_file}: no model card — export the run again")
    card = ModelCard(card_file.read_text(encoding="utf-8"))
    missing = [k for k in ("license", "library_name", "pipeline_tag", "tags") if not getattr(card.data, k, None)]
    if missing:
        raise ConfigError(f"{card_file}: front matter lacks {', '.join(missing)} — export the run again")
    return card


def check_no_local_paths(folder: Path) -> None:
    """ConfigError naming the first absolute local path in the model card or a JSON file of the export.

    The export writes base names (:mod:`meet_lightning.names`); a path here is from an older version or an edit.
    """
    found: list[tuple[Path, str]] = []
    card = folder / "README.md"
    if card.is_file():
        found += [(card, path) for path in local_paths_in_text(card.read_text(encoding="utf-8"))]
    for file in sorted(folder.rglob("*.json")):
        if found:
            break
        if file.name in VOCABULARY_FILES or not file.is_file():
            continue
        try:
            tree = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{file}: not valid JSON ({error}) — export the run again") from None
        found += [(file, path) for path in local_paths(tree)]
    if found:
        file, path = found[0]
        raise ConfigError(
            f"{file}: holds the local path {path!r} — nothing was sent; export the run again (exports keep base"
            " names) or replace the path by hand"
        )


def push_export(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> str:
    """Uploads ``folder`` (an ``export/``) to the model repository ``repo_id``; returns the commit URL.

    Args:
        folder: The export folder.
        repo_id: ``owner/name`` on the Hub (created when missing).
        private: Create the repository as private (an existing one keeps its visibility).
        revision: Branch to commit to (created from the default branch when missing); default ``main``.
        commit_message: The Hub commit's message.
        api: An ``HfApi``-like client (tests); default ``HfApi()`` with the saved token.

    Raises:
        ConfigError: Not an export, a local path in it, offline, or no token.
        PublishError: The Hub refused the request or could not be reached.
    """
    folder = Path(folder)
    read_schema(folder)
    check_export_card(folder)
    check_no_local_paths(folder)
    if is_offline_mode():
        raise ConfigError("push needs the Hub but HF_HUB_OFFLINE is set — unset HF_HUB_OFFLINE to publish")
    if api is None:
        if get_token() is None:
            raise ConfigError("no Hugging Face token — run `hf auth login` or set HF_TOKEN, then push again")
        api = HfApi()
    existed = None
    try:
        existed = api.repo_exists(repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message or f"meet_lightning export ({folder.name})",
        )
    except Exception as error:
        if existed is False:
            _delete_quietly(api, repo_id)
        if not is_hub_failure(error):
            raise  # an internal bug keeps its traceback
        raise PublishError(
            f"push to {repo_id} failed: {' '.join(str(error).split())[:300]} — check the repo id and your token's write access"
        ) from None
    return str(getattr(commit, "commit_url", commit))


def is_hub_failure(error: Exception) -> bool:
    """Whether ``error`` is the Hub refusing (HTTP) or the network failing (the HTTP client's transport errors)."""
    return isinstance(error, (HfHubHTTPError, OSError)) or type(error).__module__.split(".")[0] in ("httpx", "httpx2")


def _delete_quietly(api: Any, repo_id: str) -> None:
    """Removes the repository this push created; an error here must not hide the upload's own."""
    try:
        api.delete_repo(repo_id)
    except Exception as error:  # noqa: BLE001 - the upload's error is the one to report
        if not is_hub_failure(error):
            raise
