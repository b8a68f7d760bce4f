"""One error hierarchy for cdp.

Each class carries three facts, read in exactly one place each:

- `exit_code`: the process exit code (cdp_common.daemon for the daemons,
  cdpctl.cli for the CLI). Codes are unique per class family and documented
  once, in docs/OPERATIONS.md §11; `EXIT_CODES` below is that table.
- `transient`: whether retrying may help (reconnect loops retry only these;
  cdp_common.backoff) or the error is permanent (give up and report).
- `grpc_status`: the status a server ends a call with when it raises this
  (cdp_common.rpc.abort; the name of a `grpc.StatusCode`, so this module does
  not import grpc).

An instance may override `grpc_status` and `transient` (keyword arguments):
the same `ProtocolError` is a retryable seq gap in one place and a wrong first
message in another.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130


class CdpError(Exception):
    """Base of every error cdp raises on purpose."""

    exit_code = 2
    transient = False
    grpc_status = "INTERNAL"

    def __init_subclass__(cls, exit_code: int | None = None, transient: bool | None = None,
                          grpc_status: str | None = None, **kw: Any) -> None:
        """`class X(CdpError, exit_code=4, grpc_status="INVALID_ARGUMENT")`: unset = inherited."""
        super().__init_subclass__(**kw)
        for name, value in (("exit_code", exit_code), ("transient", transient),
                            ("grpc_status", grpc_status)):
            if value is not None:
                setattr(cls, name, value)

    def __init__(self, *args: object, grpc_status: str | None = None,
                 transient: bool | None = None) -> None:
        super().__init__(*args)
        if grpc_status is not None:
            self.grpc_status = grpc_status
        if transient is not None:
            self.transient = transient


class ConfigError(CdpError, exit_code=2, grpc_status="INVALID_ARGUMENT"):
    """A configuration file or value is invalid; the message names the field."""


class FormatError(CdpError, exit_code=4, grpc_status="INVALID_ARGUMENT"):
    """Bytes do not decode: bad magic, version, length, bounds or checksum."""


class TornRecordError(FormatError):
    """A journal record is cut short (torn tail after a crash)."""


class AuthenticationError(CdpError, exit_code=5, grpc_status="PERMISSION_DENIED"):
    """A frame failed its AEAD tag: wrong key, tampering, replay or reordering."""


class NotAuthorizedError(AuthenticationError):
    """The peer's certificate does not allow this: wrong role, scope or identity, a
    revoked certificate, or a session its signed assignment does not name
    (docs/SECURITY.md)."""


class ProtocolError(CdpError, exit_code=6, grpc_status="INVALID_ARGUMENT"):
    """The peer broke the stream protocol (wrong message order, seq gap, ...)."""


class FencedError(CdpError, exit_code=7, grpc_status="FAILED_PRECONDITION"):
    """A stream carries an epoch older than the one already seen for its policy."""


class UnavailableError(CdpError, exit_code=8, transient=True, grpc_status="UNAVAILABLE"):
    """A peer cannot be reached right now; reconnecting may help."""


class CoordinatorUnreachable(UnavailableError, exit_code=3):
    """The coordinator does not answer (its own exit code: scripts tell it apart)."""


class StorageError(CdpError, exit_code=9, transient=True, grpc_status="UNAVAILABLE"):
    """Local storage failed (disk full, I/O error); nothing partial was committed."""


class CorruptStateError(FormatError, StorageError, exit_code=FormatError.exit_code,
                        transient=False, grpc_status=FormatError.grpc_status):
    """A state file or database on local storage does not decode.

    A FormatError (exit 4, permanent: retrying reads the same bytes) that is
    also a StorageError, since the fault lies in local storage, not in a peer.
    """


class InvalidRequestError(CdpError, grpc_status="INVALID_ARGUMENT"):
    """A request a server refuses as malformed (empty id, not JSON, unknown field)."""


class NotFoundError(CdpError, grpc_status="NOT_FOUND"):
    """A request names something that does not exist (a policy, a restore point)."""


class AlreadyExistsError(CdpError, grpc_status="ALREADY_EXISTS"):
    """A create names something that exists already."""


class RemoteError(CdpError, exit_code=8):
    """A call to a peer failed; built only by cdp_common.rpc.remote_error.

    `code` is the gRPC status name, `details` its text, `answered` whether the
    peer's own code ended the call (the `cdp-answered` trailer) rather than the
    transport, a proxy in between or a crash. `transient` follows the code.
    """

    def __init__(self, message: str, *, code: str, details: str, answered: bool,
                 transient: bool) -> None:
        super().__init__(message, grpc_status=code, transient=transient)
        self.code = code
        self.details = details
        self.answered = answered


class RemoteProtocolError(RemoteError, ProtocolError, exit_code=6):
    """The remote side answered that *we* are wrong (permanent); do not retry blindly."""


EXIT_CODES: tuple[tuple[int, str, str], ...] = (
    (EXIT_OK, "ok", "clean exit, config valid, everything healthy"),
    (EXIT_WARNING, "warning", "a policy degraded or unprotected while enabled, a skewed "
                              "clock, an active alarm (cdpctl)"),
    (CdpError.exit_code, "error", "invalid config, a failed command, a fatal error; "
                                  "a node down or a policy in error (cdpctl)"),
    (CoordinatorUnreachable.exit_code, "coordinator unreachable", "the coordinator "
                                                                  "did not answer"),
    (FormatError.exit_code, "format", "a file or message does not decode: corrupt state, "
                                      "bad magic, checksum"),
    (AuthenticationError.exit_code, "authentication", "wrong key or tampered frame"),
    (ProtocolError.exit_code, "protocol", "a peer broke the stream protocol, or said we did"),
    (FencedError.exit_code, "fenced", "a newer epoch owns the policy"),
    (UnavailableError.exit_code, "peer unavailable", "a peer other than the coordinator "
                                                     "could not be reached"),
    (StorageError.exit_code, "storage", "local storage failed: disk full, I/O error"),
    (EXIT_USAGE, "usage error", "bad or missing arguments"),
    (EXIT_INTERRUPTED, "interrupted", "SIGINT, Ctrl-C"),
)
"""(code, name, meaning) for every exit code; docs/OPERATIONS.md §11 shows this table."""


def exit_codes_help() -> str:
    """The exit-code table for --help texts (cdpctl and every daemon)."""
    rows = "\n".join(f"  {code:<3} {name}: {meaning}" for code, name, meaning in EXIT_CODES)
    return f"exit codes:\n{rows}"
