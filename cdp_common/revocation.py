"""The revocation list: certificate serials whose calls every node refuses
(`[tls] revoked_file`, docs/SECURITY.md "Revocation"; enforced by cdp_common.authz)."""

from __future__ import annotations

from pathlib import Path

from cdp_common.errors import ConfigError


def load_revoked(path: str) -> frozenset[int]:
    """Serials from `path`: one per line in hex (as `openssl x509 -serial` or `cdpctl pki
    revoke` writes them; a 'serial=' prefix and ':' separators allowed), '#' comments."""
    if not path:
        return frozenset()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tls.revoked_file: cannot read {path} ({exc})") from None
    serials = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip().removeprefix("serial=").replace(":", "")
        if not line:
            continue
        try:
            serials.add(int(line, 16))
        except ValueError:
            raise ConfigError(f"tls.revoked_file: {path} line {n}: {raw.strip()!r} is not a "
                              "hex certificate serial") from None
    return frozenset(serials)
