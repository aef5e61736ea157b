"""Can the jobs get a hub model or dataset: a local copy, or the hub (with a token where the repo is gated)?

Torch-free and fast: a local copy is looked up in the Hugging Face cache folders (no file is opened); the
hub is asked only when something is not cached and ``HF_HUB_OFFLINE`` is not set, after one TCP probe of
its host (a few seconds at most when it cannot be reached). The answers are about *this* host: preflight
reports them as environment problems, separate from problems of the config itself.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the HF hub cache (or, for a dataset, the ``datasets`` cache) holds a snapshot of ``repo_id``."""
    folder = hub_cache() / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    if folder.is_dir() and any(folder.iterdir()):
        return True
    if repo_type == "dataset":
        from huggingface_hub import constants

        root = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
        return (root / repo_id.replace("/", "___")).is_dir()
    return False


def token_available() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def access_problems(repos: dict[tuple[str, str], dict]) -> list[str]:
    """One line per repo the jobs could not get. ``repos``: ``{(repo_id, "model"|"dataset"): {"gated": bool,
    "used_by": "model llama2-7b-chat"}}``."""
    missing = {key: info for key, info in repos.items() if not cached(*key)}
    problems = []
    gated = {key: info for key, info in missing.items() if info.get("gated")}
    if gated and not token_available():
        for (repo_id, _), info in gated.items():
            problems.append(f"{repo_id} ({info['used_by']}) is gated on the hub and not in the local cache: the jobs "
                            "need an HF token (HF_TOKEN, or `hf auth login`) of an account granted access on its page")
    rest = {key: info for key, info in missing.items() if key not in gated or token_available()}
    if not rest:
        return problems
    if offline():
        return problems + [f"{repo_id} ({info['used_by']}) is not in the local HF cache and HF_HUB_OFFLINE is set: "
                           f"download it first or use a local copy" for (repo_id, _), info in rest.items()]
    if not hub_reachable():
        return problems + [f"{repo_id} ({info['used_by']}) is not in the local HF cache and the hub cannot be reached "
                           "from this host" for (repo_id, _), info in rest.items()]
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    for (repo_id, repo_type), info in rest.items():
        try:
            auth_check(repo_id, repo_type=repo_type)
        except GatedRepoError:
            problems.append(f"{repo_id} ({info['used_by']}) is gated: the HF token here has no access (request it on "
                            "the repo's page)")
        except RepositoryNotFoundError:
            problems.append(f"{repo_id} ({info['used_by']}) does not exist on the hub (or is private)")
        except (HfHubHTTPError, OSError) as err:
            problems.append(f"{repo_id} ({info['used_by']}): the hub did not answer ({str(err).splitlines()[0][:100]})")
    return problems
