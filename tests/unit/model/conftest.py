"""Shared fixtures: a two-host lab (a: 198.51.100.1 with SG, b: 198.51.100.2 without) in strict mode."""

from __future__ import annotations

import pytest

from harness.model import Network


@pytest.fixture
def net() -> Network:
    return Network(strict=True)


@pytest.fixture
def a(net):
    return net.add_host("a", addrs=["198.51.100.1", "2001:db8::1"], sg=True)


@pytest.fixture
def b(net):
    return net.add_host("b", addrs=["198.51.100.2", "2001:db8::2"], sg=False)

