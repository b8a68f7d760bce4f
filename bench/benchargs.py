"""The command-line options every storage benchmark here shares."""

from __future__ import annotations

import argparse


def parser(doc: str | None, size_mib: int) -> argparse.ArgumentParser:
    """A parser with the benchmark's docstring as help, --dir and --size-mib."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp",
                    help="scratch directory for the disks and stores (default: /var/tmp)")
    ap.add_argument("--size-mib", type=int, default=size_mib,
                    help=f"disk size in MiB (default: {size_mib})")
    return ap
