"""A local Hugging Face cache as a checkpoint source: "facebook/DiT-XL-2-256" -> its snapshot folder.

fastdit never downloads. huggingface_hub resolves the id with ``local_files_only=True``, which
reads the cache's refs and snapshots and opens no connection; the cache is where huggingface_hub
puts it (``HF_HUB_CACHE``, or ``HF_HOME``/hub, else ~/.cache/huggingface/hub).
"""
import os
import re

from fastdit.models.config import CheckpointError

# Hugging Face's repo names: letters, digits, "-", "_", "."; no "--" or ".." (huggingface_hub's
# validate_repo_id), owner and name each at most 96 characters.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
# A relative checkpoint path such as runs/model.pt also looks like owner/name.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


def is_repo_id(source) -> bool:
    """Whether ``source`` names a Hugging Face repo ("owner/name") rather than a local path: a string
    of that form that is not an existing path and does not end like a checkpoint file."""
    if not isinstance(source, str) or os.path.exists(source):
        return False
    if "--" in source or ".." in source or source.lower().endswith(CHECKPOINT_SUFFIXES):
        return False
    return _REPO_ID.match(source) is not None


def resolve_repo_id(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot folder of ``repo_id`` (at ``revision``: a branch, tag or commit; None is
    the default branch) from the Hugging Face cache. Never downloads: when the repo is not cached
    the error says how to fetch it."""
    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id: expected a Hugging Face repo id such as 'facebook/DiT-XL-2-256', got {repo_id!r}")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as error:
        raise ImportError(f"reading {repo_id} from the Hugging Face cache needs huggingface_hub: "
                          f"pip install 'fastdit[diffusers]' ({error})") from error
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as error:
        at = "" if revision is None else f" at revision {revision}"
        raise CheckpointError(
            f"{repo_id}{at} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and fastdit never "
            f"downloads: fetch it with `hf download {repo_id}` (huggingface_hub's CLI; older versions: "
            f"`huggingface-cli download {repo_id}`), then pass the id again (no local path {repo_id} exists either)"
        ) from error
