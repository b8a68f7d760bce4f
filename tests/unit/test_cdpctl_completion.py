"""`cdpctl completion`: the generated scripts parse and complete like a shell would."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from cdpctl import cli, completion

pytestmark = pytest.mark.timeout(30)


def test_tree_comes_from_the_parser() -> None:
    tree = completion.command_tree(cli.build_parser())
    assert {"health", "status", "lab", "pki", "keygen", "completion"} <= set(tree[""].words)
    assert {"up", "down", "status", "restart"} <= set(tree["lab"].words)
    assert "--dir" in tree["lab up"].words
    assert "--config" not in tree["health"].words
    assert "--coordinator" in tree["health"].value_options
    assert "--json" not in tree["health"].value_options


def _complete(script: str, words: list[str]) -> list[str]:
    line = " ".join(words)
    prog = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _cdpctl; "
            'printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash missing")
def test_bash_script_completes_commands_and_options(tmp_path: pytest.TempPathFactory) -> None:
    done = subprocess.run([sys.executable, "-m", "cdpctl", "completion", "bash"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert _complete(script, ["cdpctl", "he"]) == ["health"]
    assert _complete(script, ["cdpctl", "lab", "u"]) == ["up"]
    assert "--disk-size" in _complete(script, ["cdpctl", "lab", "up", "--dir", "x", "--d"])
    assert _complete(script, ["cdpctl", "pki", "issue", "--h"]) == ["--help", "--host"]
    # an option taking a file completes paths, not words
    assert "health" not in _complete(script, ["cdpctl", "health", "--ca", ""])


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh missing")
def test_zsh_script_parses() -> None:
    script = completion.script("zsh", cli.build_parser())
    assert script.startswith("#compdef cdpctl")
    assert subprocess.run(["zsh", "-n"], input=script, text=True).returncode == 0


def test_unknown_shell_is_a_usage_error() -> None:
    assert cli.run(["completion", "fish"]) == 64
