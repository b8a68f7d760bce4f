"""`cdpctl --help`, completion and the parser load no heavy module (issue 15 item 5):
grpc, cryptography and protobuf are imported only by the commands that use them,
so a shell completion or a help page starts fast. Checked in a fresh interpreter
by what got imported, not by timing (timing is the benchmark's job)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

HEAVY = ("grpc", "cryptography", "google.protobuf", "cdp_common.config")
"""Modules (and their submodules) that only a command that uses them may load; the
generated *_pb2 modules too (their empty parent packages are light)."""

PROBE = """
import json, sys
from cdpctl import cli
argv = json.loads(sys.argv[1])
try:
    code = cli.run(argv)
except SystemExit as exc:
    code = exc.code
# a module registered by cdpctl.lazy but never used is still a _LazyModule (type()
# does not load it, attribute access would)
loaded = sorted(m for m, mod in list(sys.modules.items())
                if type(mod).__name__ != "_LazyModule"
                and (m.endswith(("_pb2", "_pb2_grpc"))
                     or any(m == h or m.startswith(h + ".") for h in json.loads(sys.argv[2]))))
print(json.dumps({"code": code, "loaded": loaded}), file=sys.stderr)
"""


def loaded_by(*argv: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(argv)),
                           json.dumps(HEAVY)], capture_output=True, text=True, timeout=30,
                          check=False)
    result: dict[str, object] = json.loads(done.stderr.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("argv", [
    ["--help"], ["policy", "--help"], ["restore", "--help"], ["lab", "up", "--help"],
    ["pki", "issue", "--help"], ["completion", "bash"], ["health", "--help"],
])
def test_help_and_completion_import_no_heavy_module(argv: list[str]) -> None:
    result = loaded_by(*argv)
    assert result["code"] == 0, result
    assert result["loaded"] == [], f"{argv} imported {result['loaded']}"


def test_a_command_that_needs_grpc_still_gets_it() -> None:
    # no coordinator listens on port 1: the command must load grpc and fail cleanly
    result = loaded_by("health", "--coordinator", "127.0.0.1:1", "--insecure",
                       "--timeout", "0.5")
    assert result["code"] == 3, result
    assert "grpc" in result["loaded"], result
