"""Hugging Face repo ids resolve from a local cache only (a fake one here); an uncached id says how to get it."""
import os
import subprocess
import sys

import pytest

from fastdit.integrations.hub import is_repo_id, resolve_repo_id
from fastdit.models.checkpoint import CheckpointError

pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # after the skip

REPO_ID = "facebook/DiT-XL-2-256"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root, repo_id=REPO_ID, commit=COMMIT):
    """huggingface_hub's cache layout: models--<owner>--<name>/{refs/main, snapshots/<commit>/...}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_CACHE into its constants at import: point the constant there too.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were resolution to reach for the network, it would fail here
    return tmp_path


def test_cached_repo_resolves_to_its_snapshot(hub_cache):
    snapshot = fake_cache(hub_cache)
    assert os.path.samefile(resolve_repo_id(REPO_ID), snapshot)
    assert os.path.samefile(resolve_repo_id(REPO_ID, revision=COMMIT), snapshot)


def test_uncached_repo_says_how_to_get_it(hub_cache):
    expected = r"not in the local Hugging Face cache .* `hf download facebook/DiT-XL-2-512`"
    with pytest.raises(CheckpointError, match=expected):
        resolve_repo_id("facebook/DiT-XL-2-512")
    fake_cache(hub_cache)
    with pytest.raises(CheckpointError, match="at revision v2 is not in the local Hugging Face cache"):
        resolve_repo_id(REPO_ID, revision="v2")


def test_resolution_follows_the_environment(tmp_path):
    """The cache a user points HF_HUB_CACHE at, in a fresh process (the constant is read at import)."""
    snapshot = fake_cache(tmp_path)
    code = f"from fastdit.integrations.hub import resolve_repo_id; print(resolve_repo_id({REPO_ID!r}))"
    environment = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert os.path.samefile(result.stdout.strip(), snapshot)


@pytest.mark.parametrize("source, expected", [
    ("facebook/DiT-XL-2-256", True),
    ("meta-llama/Llama-3.1-8B", True),
    ("runs/model.pt", False),
    ("results/000-DiT-XL-2/checkpoints/0400000.pt", False),
    ("out/model.safetensors", False),
    ("DiT-XL-2-256x256.pt", False),
    ("./facebook/DiT", False),
    ("/abs/path", False),
    ("owner/", False),
    ("a--b/c", False),
    ("a/b..c", False),
    (3, False),
])
def test_is_repo_id(source, expected):
    assert is_repo_id(source) is expected


def test_existing_path_is_not_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "facebook" / "DiT-XL-2-256").mkdir(parents=True)
    assert not is_repo_id(REPO_ID)


def test_resolve_refuses_a_path():
    with pytest.raises(ValueError, match="repo_id: expected a Hugging Face repo id"):
        resolve_repo_id("runs/model.pt")
