"""Resolve a Hugging Face hub id to a local snapshot directory through huggingface_hub's cache."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

logger = logging.getLogger(__name__)

# Everything load_hf_dir reads (config, generation config, tokenizer files, chat templates,
# transformers-named safetensors), never the *.bin / consolidated.* / *.gguf duplicates
# many repos also hold.
ALLOW_PATTERNS = ["*.json", "*.jinja", "model*.safetensors"]

_TRUTHY = {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub itself only reads it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, from the environment as it is now."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def resolve_hub(repo_id: str, revision: str | None = None) -> str:
    """Local snapshot directory of `repo_id` (downloading what is missing unless offline)."""
    offline = is_offline()
    where = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=hub_cache_dir(),
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a valid Hugging Face model id ({e}); use ORG/NAME") from None
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        reason = "HF_HUB_OFFLINE=1" if offline else "the Hub could not be reached"
        raise RuntimeError(f"model {where} is not in the Hugging Face cache ({reason}); download it once "
                           "with network access or use --w DIR") from None
    except GatedRepoError:
        raise RuntimeError(f"model {where} is gated; accept its license on huggingface.co and set HF_TOKEN "
                           "to a token with access") from None
    except RepositoryNotFoundError:
        raise RuntimeError(f"model {where} was not found on the Hub; check the id, or set HF_TOKEN if it is "
                           "private") from None
    except RevisionNotFoundError:
        raise RuntimeError(f"revision {revision!r} of model {repo_id} does not exist; use a branch, tag or "
                           "commit of that repo") from None
    logger.info("resolved %s to %s", where, path)
    return str(path)
