"""One error hierarchy for cdp.

Each class carries the CLI exit code it maps to and whether it is transient
(the caller should reconnect/retry) or permanent (give up and report).
"""

from __future__ import annotations


class CdpError(Exception):
    """Base of every error cdp raises on purpose."""

    exit_code = 1
    transient = False


class ConfigError(CdpError):
    """A configuration file or value is invalid; the message names the field."""

    exit_code = 2


class FormatError(CdpError):
    """Bytes do not decode: bad magic, version, length, bounds or checksum."""

    exit_code = 3


class TornRecordError(FormatError):
    """A journal record is cut short (torn tail after a crash)."""


class AuthenticationError(CdpError):
    """A frame failed its AEAD tag: wrong key, tampering, replay or reordering."""

    exit_code = 4


class ProtocolError(CdpError):
    """The peer broke the stream protocol (wrong message order, seq gap, ...)."""

    exit_code = 5


class RemoteProtocolError(ProtocolError):
    """The remote side told us that *we* broke the protocol; do not retry blindly."""


class FencedError(CdpError):
    """A stream carries an epoch older than the one already seen for its policy."""

    exit_code = 6


class UnavailableError(CdpError):
    """A peer cannot be reached right now; reconnecting may help."""

    exit_code = 7
    transient = True


class CoordinatorUnreachable(UnavailableError):
    """The coordinator does not answer."""

    exit_code = 3


class StorageError(CdpError):
    """Local storage failed (disk full, I/O error); nothing partial was committed."""

    exit_code = 8
    transient = True
