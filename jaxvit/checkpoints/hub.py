"""Hub ids: ``hf-hub:ORG/NAME[@REVISION]`` -> a folder in the Hugging Face cache.

Anything that takes a checkpoint path (``load_pretrained``,
``load_for_inference``, ``predict --checkpoint``, ``visualize``,
``init_from``) also takes a hub id, as timm's ``create_model("hf-hub:...")``
does. The repository is fetched by ``huggingface_hub`` into its cache, so
its settings hold: ``HF_HOME`` / ``HF_HUB_CACHE`` (where), ``HF_HUB_OFFLINE=1``
(the cache only), ``HF_TOKEN`` or a stored login (gated and private
repositories), ``HF_ENDPOINT`` (a mirror). Only what a reader may need is
fetched: the JSON configs and the safetensors weights, and PyTorch weights
only for a repository without safetensors. The folder is then read like any
other (``registry.folder_format``): a timm, Hugging Face or open_clip folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PREFIX = "hf-hub:"
# ORG/NAME as the Hub spells them; a revision is a branch, tag or commit.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_REVISION = re.compile(r"^[\w./-]{1,255}$")
SAFE_PATTERNS = ("*.json", "*.safetensors")
TORCH_PATTERNS = ("*.json", "*.bin", "*.pth")


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a hub id (``hf-hub:...``) rather than a file or folder."""
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(hub_id: str) -> tuple[str, str | None]:
    """``"hf-hub:ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")`` (revision None without ``@``)."""
    body = hub_id[len(PREFIX) :]
    repo, at, revision = body.partition("@")
    if not _HUB_ID.match(repo) or ".." in repo or (at and not _REVISION.match(revision)):
        raise ValueError(f"{hub_id!r} is not a hub id: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in (".safetensors", ".bin", ".pth") for p in folder.iterdir())


def download(hub_id: str) -> Path:
    """The cache folder of ``hub_id``'s repository at its revision, fetched if needed.

    Raises ``FileNotFoundError`` in one line naming the id for a repository,
    revision or file that does not exist, is gated, or cannot be fetched
    (offline with nothing cached, no network).
    """
    repo, revision = parse(hub_id)
    # imported here: most reads never name a hub id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(patterns: tuple[str, ...]) -> Path:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(patterns)))

    try:
        folder = fetch(SAFE_PATTERNS)
        if not _has_weights(folder):
            folder = fetch(TORCH_PATTERNS)
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{hub_id}: the repository {repo} has no revision {revision!r}") from None
    except GatedRepoError:
        raise FileNotFoundError(
            f"{hub_id}: {repo} is gated: accept its terms on the Hub and log in (HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{hub_id}: no repository {repo} on the Hub (or it is private: log in with HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise FileNotFoundError(f"{hub_id}: not in the local cache and {why}") from None
    except (HfHubHTTPError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{hub_id}: could not fetch it ({message})") from None
    if not _has_weights(folder):
        raise FileNotFoundError(f"{hub_id}: the repository holds no .safetensors, .bin or .pth weights")
    return folder


def resolve(path: str | os.PathLike) -> Path:
    """``path`` as a local path: a hub id is fetched (``download``), anything else is kept."""
    return download(path) if is_hub_id(path) else Path(path)
