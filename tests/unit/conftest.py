"""Unit tests build their own Paths in tmp dirs: a SOCKLAB_CACHE of the shell (the shared image cache of
a developer's lab) would point their image cache at it, and 14 image tests then fail or write there."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_cache_of_the_shell(monkeypatch):
    monkeypatch.delenv("SOCKLAB_CACHE", raising=False)
