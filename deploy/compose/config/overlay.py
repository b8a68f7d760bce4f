"""Run one of the bed's daemons on its config with a few keys replaced.

The etcd variant of the test bed (compose.etcd.yaml) is the default bed with
two coordinators on etcd: every node's `node.coordinator` becomes the list of
both, and the coordinators gain `store = "etcd"`. Rather than a second copy
of every config, which would drift from the first, each daemon of the variant
starts through this script:

    python3 overlay.py BASE.toml '{"node": {"coordinator": "a:7000,b:7000"}}' \
        -- cdp-filter --log-format json run

It loads BASE.toml, merges the JSON into it table by table (a JSON value
replaces the TOML one; tables merge key by key), writes the result to
/run/cdp-conf/<base name>, runs `check-config` on it and then execs the
daemon with `--config` that file. Runs with the image's python (cdp
installed: cdpctl.tomlw writes the TOML).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from cdpctl import tomlw

OUT_DIR = Path("/run/cdp-conf")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--":
        print("usage: overlay.py BASE.toml JSON -- DAEMON [ARGS...] (run is the last arg)",
              file=sys.stderr)
        return 2
    base, over, daemon = Path(argv[1]), json.loads(argv[2]), argv[4:]
    doc = merge(tomllib.loads(base.read_text()), over)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / base.name
    out.write_text(f"# {base} with {argv[2]} (deploy/compose/config/overlay.py)\n"
                   + tomlw.dumps(doc))
    # a wrong key fails here, with the daemon's own message, not as a crash loop
    check = subprocess.run([daemon[0], "check-config", "--config", str(out)])
    if check.returncode != 0:
        return check.returncode
    os.execvp(daemon[0], [*daemon, "--config", str(out)])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
