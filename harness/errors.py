"""Errors a user can act on; tasks print them as one line and exit 2."""


class SocklabError(Exception):
    """Something the user can fix or must know about. The message is the whole story."""

    exit_code = 2


class HostToolMissing(SocklabError):
    """A program socklab needs on the host is not installed."""


class ImageError(SocklabError):
    """The guest image could not be built, or a cached one is damaged."""


class LabError(SocklabError):
    """The lab could not be started, reached or stopped."""


class GuestUnreachable(LabError):
    """A guest never answered; the message carries the console's last lines."""


class SSHError(LabError):
    """SSH to a guest failed: connection, host key or a command."""


class SSHRefused(SSHError):
    """sshd answered, but the login is final: the host key is not the pinned one, or the key was refused."""


class ConsoleError(LabError):
    """The serial console did not show what we waited for."""
