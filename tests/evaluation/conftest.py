"""The evaluation tests' process (one, on the CPU) and their own fastdit cache."""
import pytest
import torch

from fastdit.distributed import Process


@pytest.fixture
def process():
    return Process(0, 1, 0, torch.device("cpu"), None)


@pytest.fixture(autouse=True)
def fastdit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIT_CACHE", str(tmp_path / "cache"))
