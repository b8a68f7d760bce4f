"""`cdpctl pki init|issue` and `cdpctl keygen`: certificates for mutual TLS, payload keys.

Theory of operation: thin shells over cdp_common.pki and cdp_common.crypto;
what is here is the refusal to overwrite an existing CA or key and the
checks of the node id, each with a message that says what to do instead.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from cdp_common import identity
from cdp_common.errors import CdpError
from cdp_common.names import NAME_RULE
from cdpctl import labplan, lazy
from cdpctl.cmdline import Context, Subparsers
from cdpctl.state import UsageError

if TYPE_CHECKING:
    from cdp_common import assignsig, crypto
    from cdp_common import pki as certs
else:   # cryptography, loaded when a command runs (cdpctl.lazy)
    assignsig = lazy.module("cdp_common.assignsig")
    crypto = lazy.module("cdp_common.crypto")
    certs = lazy.module("cdp_common.pki")


def cmd_pki_init(args: argparse.Namespace, ctx: Context) -> int:
    directory = Path(args.dir)
    if (directory / "ca.pem").exists() or (directory / "ca.key").exists():
        raise CdpError(f"{directory} already holds a CA (ca.pem/ca.key); not overwriting it")
    ca_pem, ca_key = certs.create_ca(directory)
    print(f"created CA {ca_pem} (private key {ca_key}, keep it secret)")
    return 0


def _issue(directory: Path, name: str, hosts: list[str], role: str, scope: str,
           force: bool) -> int:
    ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
    if not ca_pem.exists() or not ca_key.exists():
        raise CdpError(f"no CA in {directory}; create one with `cdpctl pki init --dir {directory}`")
    if not labplan.valid_id(name):
        raise UsageError(f"{name!r}: {NAME_RULE}")
    existing = [p for p in (directory / f"{name}.pem", directory / f"{name}.key") if p.exists()]
    if existing and not force:
        raise CdpError(f"{existing[0]} exists; not overwriting a certificate or key "
                       "(pass --force to replace both, e.g. to renew)")
    try:
        pem, key = certs.create_node_cert(ca_pem, ca_key, directory, name, hosts,
                                          role=role, scope=scope)
    except ValueError as exc:
        raise CdpError(f"cannot issue a certificate for {name}: {exc}") from None
    who = identity.Identity(role, name, scope)
    print(f"issued {pem} and {key} for {who} ({who.uri()})")
    return 0


def cmd_pki_issue(args: argparse.Namespace, ctx: Context) -> int:
    return _issue(Path(args.dir), args.node_id, args.host, args.role, "", args.force)


def cmd_pki_issue_operator(args: argparse.Namespace, ctx: Context) -> int:
    return _issue(Path(args.dir), args.name, [], identity.OPERATOR, args.scope, args.force)


def cmd_pki_signing_key(args: argparse.Namespace, ctx: Context) -> int:
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / "assignments.key", directory / "assignments.pub"
    assignsig.new_key_pair(private, public)  # ConfigError if either exists
    print(f"created the assignment signing key {private} (coordinator.signing_key_file, "
          f"keep it secret) and {public} (tls.assignment_key_file of every other node)")
    return 0


def cmd_pki_revoke(args: argparse.Namespace, ctx: Context) -> int:
    import datetime

    from cryptography import x509

    from cdp_common.revocation import load_revoked
    pem = Path(args.dir) / f"{args.name}.pem"
    try:
        cert = x509.load_pem_x509_certificate(pem.read_bytes())
    except OSError as exc:
        raise CdpError(f"cannot read {pem} ({exc.strerror})") from None
    except ValueError:
        raise CdpError(f"{pem} is not a PEM certificate") from None
    out = Path(args.file)
    revoked = load_revoked(str(out)) if out.exists() else frozenset()  # ConfigError if bad
    serial = cert.serial_number
    if serial in revoked:
        print(f"{args.name} (serial {serial:x}) is already in {out}")
        return 0
    who = identity.from_certificate(cert)
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    with out.open("a", encoding="utf-8") as f:
        f.write(f"serial={serial:X}  # {who or args.name}, revoked {day}\n")
    print(f"revoked {args.name} (serial {serial:x}) in {out}; copy it to every node's "
          "[tls] revoked_file and reload them (systemctl reload cdp-...)")
    return 0


def cmd_keygen(args: argparse.Namespace, ctx: Context) -> int:
    if args.rotate or args.retire is not None:
        return _change_ring(Path(args.file), args.retire)
    try:
        crypto.write_new_key(args.file)
    except FileExistsError:
        raise CdpError(f"{args.file} exists; not overwriting a key (to add a new key "
                       f"and keep the old one: cdpctl keygen --rotate {args.file})") from None
    print(f"wrote a new master key to {args.file} (key id 0, mode 0600)")
    return 0


def _change_ring(path: Path, retire: int | None) -> int:
    """--rotate (retire None) or --retire ID: rewrite the ring atomically, or nothing."""
    if not path.exists():
        raise CdpError(f"{path} does not exist; create a key first with `cdpctl keygen {path}`")
    ring = crypto.load_key_ring(path)  # ConfigError naming the file and line
    if retire is None:
        new = ring.rotated(os.urandom(crypto.KEY_BYTES))
        what = (f"added key id {new.current_id} to {path}: proxies that load it seal new "
                "sessions with it and still accept the older keys")
    else:
        new = ring.retired(retire)
        what = f"retired key id {retire} from {path}"
    crypto.write_key_ring(path, new)
    print(f"{what} (key ids now {', '.join(map(str, new.ids()))}; mode 0600)")
    return 0


def register(sub: Subparsers, ctx: Context) -> None:
    """`cdpctl pki ...` and `cdpctl keygen` (see cdpctl.cmdline.CommandGroup)."""
    fmt, epilog = ctx.formatter, ctx.epilog
    p = sub.add_parser(
        "pki", formatter_class=fmt, help="certificates for mutual TLS",
        description=textwrap.dedent("""\
            A small CA for cdp: every node gets a certificate valid as server and
            client, signed by one CA that every node trusts, naming the node's
            role and id; every operator gets one naming its scope."""),
        epilog=epilog("""\
            cdpctl pki init --dir /etc/cdp/pki
            cdpctl pki issue --dir /etc/cdp/pki coordinator --role coordinator \\
                --host coord.example.org --host 192.0.2.1"""))
    pki_sub = p.add_subparsers(dest="pki_command", metavar="PKI_COMMAND", required=True)
    q = pki_sub.add_parser(
        "init", formatter_class=fmt, help="create a CA (ca.pem, ca.key)",
        description="Create DIR/ca.pem and DIR/ca.key (mode 0600). Refuses to overwrite a CA.",
        epilog=epilog("cdpctl pki init --dir /etc/cdp/pki"))
    q.add_argument("--dir", required=True, help="PKI directory")
    q.set_defaults(func=cmd_pki_init)
    q = pki_sub.add_parser(
        "issue", formatter_class=fmt, help="issue a node certificate",
        description=textwrap.dedent("""\
            Issue DIR/NODE_ID.pem and DIR/NODE_ID.key signed by the CA in DIR, valid
            for the given host names and IP addresses (plus localhost and
            127.0.0.1), naming the node's ROLE and NODE_ID (SAN URI
            cdp://ROLE/NODE_ID): peers allow it only what that role may do
            (docs/SECURITY.md). NODE_ID must equal the node's [node] id. Point the
            node's [tls] section at the files. Keys are mode 0600. Refuses to
            overwrite an existing certificate or key unless --force."""),
        epilog=epilog("cdpctl pki issue --dir /etc/cdp/pki filter-1 --role filter "
                      "--host 192.0.2.10"))
    q.add_argument("--dir", required=True, help="PKI directory holding ca.pem and ca.key")
    q.add_argument("node_id", metavar="NODE_ID", help="node id, also the certificate's CN")
    q.add_argument("--role", required=True, choices=identity.NODE_ROLES,
                   help="the node's role ('proxy' = a proxy with role both)")
    q.add_argument("--host", action="append", default=[], metavar="H",
                   help="DNS name or IP address peers use to reach the node (repeatable)")
    q.add_argument("--force", action="store_true",
                   help="replace an existing NODE_ID.pem/.key (renewal); refused otherwise")
    q.set_defaults(func=cmd_pki_issue)
    q = pki_sub.add_parser(
        "issue-operator", formatter_class=fmt, help="issue an operator (cdpctl) certificate",
        description=textwrap.dedent("""\
            Issue DIR/NAME.pem and DIR/NAME.key for an operator, signed by the CA
            in DIR (SAN URI cdp://operator/NAME?scope=SCOPE). 'viewer' may read
            status, health, policies, alarms and restore points; 'admin' may also
            change policies, request syncs, restore and fail over
            (docs/SECURITY.md). Point cdpctl at them with --ca/--cert/--key.
            Refuses to overwrite an existing certificate or key unless --force."""),
        epilog=epilog("cdpctl pki issue-operator --dir /etc/cdp/pki alice --scope admin"))
    q.add_argument("--dir", required=True, help="PKI directory holding ca.pem and ca.key")
    q.add_argument("name", metavar="NAME", help="operator name, also the certificate's CN")
    q.add_argument("--scope", required=True, choices=identity.SCOPES,
                   help="what the operator may do: admin (everything) or viewer (read only)")
    q.add_argument("--force", action="store_true",
                   help="replace an existing NAME.pem/.key (renewal); refused otherwise")
    q.set_defaults(func=cmd_pki_issue_operator)
    q = pki_sub.add_parser(
        "revoke", formatter_class=fmt, help="add a certificate to a revocation list",
        description=textwrap.dedent("""\
            Append the serial of DIR/NAME.pem to FILE, the revocation list every node
            reads from [tls] revoked_file (re-read on SIGHUP): calls with that
            certificate are then refused. Creates FILE if needed; a serial already
            listed is not added twice; a malformed FILE is left as it is."""),
        epilog=epilog("cdpctl pki revoke --dir /etc/cdp/pki ops2 --file /etc/cdp/revoked"))
    q.add_argument("--dir", required=True, help="PKI directory holding NAME.pem")
    q.add_argument("name", metavar="NAME", help="node id or operator name of the certificate")
    q.add_argument("--file", required=True, help="the revocation list to append to")
    q.set_defaults(func=cmd_pki_revoke)
    q = pki_sub.add_parser(
        "signing-key", formatter_class=fmt, help="create the coordinator's assignment signing key",
        description=textwrap.dedent("""\
            Create DIR/assignments.key (Ed25519, mode 0600) and DIR/assignments.pub.
            The coordinator signs every assignment with the private key
            ([coordinator] signing_key_file); filters, proxies and targets accept a
            session only for an assignment signed by it ([tls] assignment_key_file =
            the .pub), so no certificate alone can open one (docs/SECURITY.md).
            Refuses to overwrite either file."""),
        epilog=epilog("cdpctl pki signing-key --dir /etc/cdp/pki"))
    q.add_argument("--dir", required=True, help="directory for assignments.key and .pub")
    q.set_defaults(func=cmd_pki_signing_key)

    p = sub.add_parser(
        "keygen", formatter_class=fmt, help="create or rotate the master key ring",
        description=textwrap.dedent("""\
            Write a fresh random 32-byte master key (hex, key id 0) to FILE, mode
            0600. Give the same key file to the source and the target proxies
            (proxy.key_file). Refuses to overwrite an existing file.
            --rotate adds a new random key to the ring in FILE under the next key
            id, in front (new sessions seal with it) and keeps the older keys
            (still accepted); --retire ID removes an old key once every proxy
            runs the new one. Both rewrite FILE atomically, mode 0600, and refuse
            a bad file without changing it. Runbook: docs/OPERATIONS.md."""),
        epilog=epilog("""\
            cdpctl keygen /etc/cdp/master.key
            cdpctl keygen --rotate /etc/cdp/master.key
            cdpctl keygen --retire 0 /etc/cdp/master.key"""))
    p.add_argument("file", metavar="FILE", help="key file to create, rotate or retire from")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rotate", action="store_true",
                     help="add a new current key under the next key id, keep the others")
    how.add_argument("--retire", type=int, metavar="ID",
                     help="remove key id ID (never the current key)")
    p.set_defaults(func=cmd_keygen)
