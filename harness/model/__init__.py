"""In-process reference model of the Linux 6.1 socket layer, drivable by the same step lists as a real kernel."""

from . import constants
from .config import ROOT, STUDENT, Creds, DEFAULT_SYSCTLS
from .constants import name_of, resolve
from .host import Host
from .network import ZEROCOPY_DEFERRED, ZEROCOPY_IMMEDIATE, Network
from .result import Result, SyscallError, errno_name
from .runner import Step, run_steps
from .views import PortOwner, SocketView, SsRow

__all__ = [
    "Network", "Host", "Result", "Creds", "ROOT", "STUDENT", "DEFAULT_SYSCTLS", "constants", "resolve",
    "ZEROCOPY_DEFERRED", "ZEROCOPY_IMMEDIATE", "SyscallError", "SocketView", "SsRow", "PortOwner",
    "Step", "run_steps", "errno_name", "name_of",
]
