"""pytest plugin (entry point ``socklab``): the ``vm`` marker and fixtures for live labs.

``lab`` attaches to a running lab or boots one, and stops only what it booted.
``--socklab-kernel K`` (repeatable; or SOCKLAB_KERNEL) runs every test that uses
``lab`` or ``model`` once per kernel, with ids like ``[kernel-6.12]``; the lab
of one kernel is stopped before the next one boots.

Under pytest-xdist (``pytest -n 2``, ``invoke test --workers 2``) each worker has a lab of its own:
worker ``gw0`` uses the lab named by SOCKLAB_LAB (the one ``invoke lab.up`` started), worker ``gwN``
the lab ``<name>-gwN`` of the same home, booted from the ready snapshot and stopped at the end.
SOCKLAB_LAB is set to the worker's lab, so commands the tests start (`invoke lab.exec`, the guides)
drive that lab too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.lab.lifecycle import Lab
from harness.lab.topology import topology
from . import log as debug_log
from .paths import Paths


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--socklab-kernel", action="append", default=[], metavar="K",
                     help="run live tests and the model fixture on this kernel (6.1, 6.12, 7.2; repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: needs the live lab (QEMU guests); boots it when none runs")
    # As on the command line: paramiko's and qemu.qmp's records dropped, or with SOCKLAB_DEBUG=1
    # the debug log on stderr (pytest shows it with -s, or for a failing test).
    debug_log.configure(debug_log.env_debug())


def kernels(config: pytest.Config) -> list[str]:
    chosen = config.getoption("socklab_kernel") or [os.environ.get("SOCKLAB_KERNEL", "")]
    return [kernel for kernel in chosen]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "socklab_kernel" in metafunc.fixturenames:
        chosen = kernels(metafunc.config)
        ids = [f"kernel-{k}" if k else "kernel-default" for k in chosen]
        metafunc.parametrize("socklab_kernel", chosen, ids=ids, scope="session")


def _series(kernel: str) -> str:
    """A kernel option as the model's series (``trixie`` -> ``6.12``); the lab's own when none was given."""
    from harness.image import build as image

    if not kernel:
        return "6.1"
    return image.resolve(Paths.default().images, kernel).kernel


_session: dict[str, str] = {}


def lab_name(environ=os.environ) -> str:
    """The lab of this test process: SOCKLAB_LAB (else ``default``), and under xdist one per worker."""
    from .paths import DEFAULT_LAB, check_lab_name

    name = environ.get("SOCKLAB_LAB") or DEFAULT_LAB
    worker = environ.get("PYTEST_XDIST_WORKER", "")
    if worker and worker != "gw0":
        name = f"{name[:32 - len(worker) - 1]}-{worker}"
    return check_lab_name(name)


@pytest.fixture(scope="session")
def lab(socklab_kernel: str) -> Iterator[Lab]:
    """The live lab (topology from SOCKLAB_TOPOLOGY, default ``default``; name: ``lab_name()``) on ``socklab_kernel``.

    A running lab is used when it runs that kernel (any kernel when none was asked for); a running
    lab on another kernel is not touched: the tests of that kernel are skipped, saying why.
    """
    if "name" not in _session:  # once: SOCKLAB_LAB names the worker's lab from here on
        _session["name"] = lab_name()
    lab = Lab(Paths.default(), _session["name"])
    os.environ["SOCKLAB_LAB"] = lab.name  # for the commands the tests run
    state = lab.load()
    booted = False
    if state is not None and all(lab.alive(state).values()):
        if socklab_kernel:
            from .model.versions import nearest_series

            running = {nearest_series(vm.kernel) for vm in state.vms if vm.kernel}
            if running and running != {_series(socklab_kernel)}:
                pytest.skip(f"the running lab runs {', '.join(sorted(running))}, not {socklab_kernel}: "
                            "`invoke lab.down` to let the tests boot it")
    else:
        from harness.image import build as image

        kernel = socklab_kernel or "bookworm"
        image.build(lab.paths, kernel)
        lab.up(os.environ.get("SOCKLAB_TOPOLOGY", "default"), accel=os.environ.get("SOCKLAB_ACCEL", "auto"),
               kernel=kernel)
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
def model(socklab_kernel: str):
    """A fresh reference model of ``socklab_kernel`` with the hosts and addresses of the lab's topology."""
    from .model import Network

    net = Network(kernel=_series(socklab_kernel))
    for host, address in topology(os.environ.get("SOCKLAB_TOPOLOGY", "default")).addresses().items():
        net.add_host(host, addrs=[address])
    return net
