#!/usr/bin/env bash
# Build an offline wheelhouse of cdp and exactly its locked runtime dependencies:
#   scripts/wheelhouse.sh DIR
# DIR then holds a wheel of every package of requirements.lock, cdp's own wheel
# (built from this checkout, protobuf modules included) and DIR/requirements.lock:
# the lock plus, for each package PyPI has only as an sdist (pyfuse3), the sha256
# of the wheel built here from that hash-checked sdist. Install it on a machine
# without network (deploy/install-systemd.sh, the compose image, the systemd
# test) with
#   WHEELHOUSE=DIR scripts/install-locked.sh VENV
# It needs the host's .venv (scripts/bootstrap.sh: the build tools are locked
# there) and network, once.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir=${1:?usage: scripts/wheelhouse.sh DIR}
py=${PYTHON:-$root/.venv/bin/python}
pip=("$py" -m pip -q --disable-pip-version-check)
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
rm -f "$dir"/*.whl "$dir/requirements.lock"

# The dependencies' part depends only on the locks and the Python: kept in a
# cache (CDP_WHEEL_CACHE, default /var/cache/cdp-wheels; skipped when it cannot
# be written), so tests that build a wheelhouse each run pay for it once.
cache_root=${CDP_WHEEL_CACHE:-/var/cache/cdp-wheels}
key="$(cat "$root/requirements.lock" "$root/requirements-build.lock" | sha256sum | cut -c1-16)"
key="$key-$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
cache="$cache_root/$key"
if [ -f "$cache/requirements.lock" ]; then
    cp "$cache"/*.whl "$cache/requirements.lock" "$dir"/
else
    # The locked files themselves, each checked against its hash, for this Python
    # and platform (the targets run the same: CPython 3.11 on glibc x86_64).
    "${pip[@]}" download --require-hashes --no-deps -d "$src" -r "$root/requirements.lock"
    mv "$src"/*.whl "$dir"/ 2>/dev/null || true
    # An sdist (verified above) becomes a wheel here, with the locked build tools.
    built=()
    for sdist in "$src"/*.tar.gz "$src"/*.zip; do
        [ -e "$sdist" ] || continue
        "${pip[@]}" wheel --no-deps --no-build-isolation --no-index -w "$dir" "$sdist"
        built+=("$(basename "$sdist")")
    done
    # DIR/requirements.lock: the lock, each locally built wheel's hash added to its entry.
    "$py" - "$root/requirements.lock" "$dir" "${built[@]}" <<'PY'
import hashlib, re, sys
from pathlib import Path
lock, out = Path(sys.argv[1]), Path(sys.argv[2])
def canonical(name): return re.sub(r"[-_.]+", "-", name).lower()
extra = {}
for sdist in sys.argv[3:]:
    project = canonical(re.match(r"(.+?)-\d", sdist).group(1))
    for wheel in out.glob("*.whl"):
        if canonical(wheel.name.split("-")[0]) == project:
            extra[project] = hashlib.sha256(wheel.read_bytes()).hexdigest()
lines = []
for line in lock.read_text().splitlines():
    lines.append(line)
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==\S+ \\$", line)
    if m and canonical(m.group(1)) in extra:
        lines.append(f"    --hash=sha256:{extra[canonical(m.group(1))]} \\")
(out / "requirements.lock").write_text(
    "# requirements.lock plus the hashes of wheels built here from its verified sdists\n"
    "# (scripts/wheelhouse.sh)\n" + "\n".join(lines) + "\n")
PY
    if mkdir -p "$cache_root" 2>/dev/null && tmp="$(mktemp -d "$cache_root/.new.XXXXXX" 2>/dev/null)"; then
        cp "$dir"/*.whl "$dir/requirements.lock" "$tmp"/ && mv -T "$tmp" "$cache" 2>/dev/null \
            || rm -rf "$tmp"
    fi
fi

# cdp itself, from this checkout (never cached).
if [ ! -f "$root/cdp_common/pb/cdp/v1/coordinator_pb2.py" ]; then
    PYTHON="$py" "$root/scripts/gen_proto.sh"
fi
"${pip[@]}" wheel --no-deps --no-build-isolation --no-index -w "$dir" "$root"

echo "wheelhouse $dir: $(ls "$dir"/*.whl | wc -l) wheels"
