"""Entry point of `cdpctl` / `python -m cdpctl`; the commands live in cdpctl.cli."""

from __future__ import annotations

import sys

from cdpctl.cli import run


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
