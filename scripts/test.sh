#!/usr/bin/env bash
# Lint, type-check and run every test tier. Run after scripts/bootstrap.sh
# (`make test` does both). Extra arguments go to pytest, e.g.
#   scripts/test.sh -k lab -x
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py=.venv/bin

# Our packages that exist and hold Python files (the generated cdp_common/pb is
# excluded by pyproject.toml for both tools).
packages=()
for d in cdp_common cdp_filter cdp_proxy cdp_target cdp_coordinator cdpctl; do
    if compgen -G "$d/*.py" >/dev/null; then packages+=("$d"); fi
done

echo "== ruff"
"$py/ruff" check "${packages[@]}" tests
echo "== mypy"
"$py/mypy" "${packages[@]}"

tiers=()
for t in tests/unit tests/integration tests/security tests/e2e; do
    if compgen -G "$t/test_*.py" >/dev/null; then tiers+=("$t"); fi
done
echo "== pytest ${tiers[*]}"
# Per-test limit, plus a hard limit on the whole run so CI never hangs.
timeout --kill-after=30 "${CDP_TEST_TIMEOUT_S:-3600}" \
    "$py/pytest" -q -ra --durations=25 --timeout="${CDP_PER_TEST_TIMEOUT_S:-300}" "${tiers[@]}" "$@" </dev/null
