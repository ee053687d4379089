"""pytest plugin (entry point ``socklab``): the ``vm`` marker and fixtures for live labs.

``lab`` attaches to a running lab or boots one, and stops only what it booted.
"""

from __future__ import annotations

import os

import pytest

from .lab import Lab
from .paths import Paths


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: needs the live lab (QEMU guests); boots it when none runs")


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The live lab (topology from SOCKLAB_TOPOLOGY, default ``default``; name from SOCKLAB_LAB); booted here if not running."""
    lab = Lab(Paths.default(), os.environ.get("SOCKLAB_LAB") or "default")
    state = lab.load()
    booted = False
    if state is None or not all(lab.alive(state).values()):
        from . import image

        image.build(lab.paths)
        lab.up(os.environ.get("SOCKLAB_TOPOLOGY", "default"), accel=os.environ.get("SOCKLAB_ACCEL", "auto"))
        booted = True
    try:
        yield lab
    finally:
        lab.close()
        if booted:
            lab.down()


@pytest.fixture(scope="session")
def client(lab: Lab):
    """SSH session to the ``client`` VM."""
    return lab.ssh("client")


@pytest.fixture(scope="session")
def server(lab: Lab):
    """SSH session to the ``server`` VM."""
    return lab.ssh("server")


@pytest.fixture
def model():
    """A fresh reference model with the lab's two hosts (client 198.51.100.1, server 198.51.100.2)."""
    from .model import Network

    net = Network()
    net.add_host("client", addrs=["198.51.100.1"])
    net.add_host("server", addrs=["198.51.100.2"])
    return net
