"""Hub access as preflight asks it, with the hub's answers stood in (no network here)."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from kvsharer.models import hub_access


def hub_error(cls, message):
    err = cls.__new__(cls)  # the real classes want an HTTP response
    Exception.__init__(err, message)
    return err


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    return tmp_path


def test_online_the_hub_says_what_is_missing(empty_cache, monkeypatch):
    answers = {"meta-llama/Llama-2-7b-chat-hf": hub_error(GatedRepoError, "403 gated"),
               "org/typo": hub_error(RepositoryNotFoundError, "404"), "Qwen/Qwen2.5-7B-Instruct": None}
    asked = []

    def auth_check(repo_id, repo_type="model"):
        asked.append((repo_id, repo_type))
        if answers[repo_id] is not None:
            raise answers[repo_id]

    monkeypatch.setattr(hub_access, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(hub_access, "token_available", lambda: True)
    monkeypatch.setattr("huggingface_hub.auth_check", auth_check)
    repos = {(r, "model"): {"gated": r.startswith("meta-llama"), "used_by": f"model {r}"} for r in answers}
    problems = hub_access.access_problems(repos)
    assert sorted(asked) == sorted(repos)
    assert len(problems) == 2
    assert any("Llama-2-7b-chat-hf" in p and "no access" in p for p in problems)
    assert any("org/typo" in p and "does not exist" in p for p in problems)


def test_a_gated_repo_without_a_token_and_an_unreachable_hub(empty_cache, monkeypatch):
    monkeypatch.setattr(hub_access, "token_available", lambda: False)
    monkeypatch.setattr(hub_access, "hub_reachable", lambda *a, **k: False)
    problems = hub_access.access_problems({("meta-llama/Llama-2-70b-chat-hf", "model"): {"gated": True, "used_by": "x"},
                                           ("Salesforce/wikitext", "dataset"): {"gated": False, "used_by": "y"}})
    assert any("Llama-2-70b-chat-hf" in p and "HF token" in p for p in problems)
    assert any("Salesforce/wikitext" in p and "cannot be reached" in p for p in problems)


def test_a_cached_copy_needs_neither_hub_nor_token(empty_cache, monkeypatch):
    snapshot = empty_cache / "hub" / "models--meta-llama--Llama-2-7b-chat-hf" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (empty_cache / "datasets" / "Salesforce___wikitext").mkdir(parents=True)  # the datasets library's cache
    monkeypatch.setattr(hub_access, "token_available", lambda: False)
    monkeypatch.setattr(hub_access, "hub_reachable", lambda *a, **k: pytest.fail("asked the hub"))
    assert hub_access.access_problems({("meta-llama/Llama-2-7b-chat-hf", "model"): {"gated": True, "used_by": "x"},
                                       ("Salesforce/wikitext", "dataset"): {"gated": False, "used_by": "y"}}) == []
