"""The docker-compose test bed, end to end: deploy/compose/run-testbed.sh.

Two sites as two compose networks (plus the proxies' wan), every daemon in
its own container, mutual TLS from a one-shot `cdpctl pki` init container,
two filters' FUSE mounts inside their containers. deploy/compose/scenario.py
then checks, from outside the daemons: a write reaches the target's replica byte
for byte (sha256); a consistency group with one disk on each filter takes a
write on filter-1 and then one on filter-2, and a group restore point taken
after both restores both disks byte for byte, with the group's status row ok;
a source proxy killed with SIGKILL has its policy rebound to the
other one and the next write arrives; during a partition between the sites
past the lease `cdpctl health` does not say OK and nothing crosses, and after
it the held-back write arrives and health is OK again; restores of an earlier
point and of the latest equal the source as it was then. The bed must come
down without leftovers.

The etcd variant (VARIANT=etcd: compose.etcd.yaml over compose.yaml) runs the
same bed with two coordinators, leader and standby, on a 3-member etcd cluster
(Debian's etcd-server in the image), every node given the list of both: a
write replicates; the leading coordinator's container is killed with SIGKILL;
the standby leads, `cdpctl status` through the list answers with every
assignment's proxies and epoch unchanged, and a second write replicates.

No image can be pulled on this project's machines and no Docker engine runs
by default, so the test, as root:
- uses the engine at $DOCKER_HOST if one answers, else starts a private one
  with deploy/compose/testbed-dockerd.sh (TEST-NET addresses only, no host
  firewall changes) and stops it afterwards by its pid;
- builds the base image locally (deploy/compose/build-base-image.sh:
  debootstrap bookworm + docker import) unless $CDP_TESTBED_BASE_IMAGE names one;
- builds wheels on this host (WHEELS=1) so the image build needs no network.
It skips, saying exactly what is missing, where any of that cannot run.
The first run takes a few minutes (debootstrap); later ones reuse the images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
PROJECT = "cdp-testbed-ci"
PROJECT_ETCD = "cdp-testbed-etcd-ci"

pytestmark = [pytest.mark.timeout(1500), pytest.mark.docker]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _engine_answers(env: dict[str, str]) -> bool:
    try:
        return _run(["docker", "version"], env, 30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def docker_env() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("the compose test bed needs root (Docker engine, FUSE in a container)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse missing: the filter container needs it")
    for tool, pkg in (("docker", "docker.io"), ("dockerd", "docker.io"),
                      ("docker-compose", "docker-compose")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (apt-get install {pkg})")
    env = dict(os.environ)
    started = False
    if not env.get("DOCKER_HOST") or not _engine_answers(env):
        done = _run([str(COMPOSE / "testbed-dockerd.sh"), "start"], env, 120)
        if done.returncode != 0:
            pytest.skip(f"could not start a Docker engine: {done.stderr.strip()[-800:]}")
        started = True
        env["DOCKER_HOST"] = done.stdout.strip().split("=", 1)[1]
        if not _engine_answers(env):
            _run([str(COMPOSE / "testbed-dockerd.sh"), "stop"], env, 120)
            pytest.skip("dockerd started but `docker version` does not answer")
    try:
        yield env
    finally:
        if started:
            _run([str(COMPOSE / "testbed-dockerd.sh"), "stop"], env, 120)


@pytest.fixture(scope="module")
def base_image(docker_env: dict[str, str]) -> str:
    image = os.environ.get("CDP_TESTBED_BASE_IMAGE", "")
    if image:
        return image
    image = "cdp-base:bookworm"
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap missing (apt-get install debootstrap): needed to build the "
                    "base image locally, since no image can be pulled")
    done = _run([str(COMPOSE / "build-base-image.sh")], {**docker_env, "IMAGE": image}, 1200)
    if done.returncode != 0:
        pytest.skip(f"could not build the base image: {(done.stdout + done.stderr)[-800:]}")
    return image


def _leftovers(env: dict[str, str], project: str = PROJECT) -> list[str]:
    out = []
    for what in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        done = _run(["docker", *what, "--filter", f"label=com.docker.compose.project={project}",
                     "--format", "{{.Names}}" if what[0] == "ps" else "{{.Name}}"],
                    env, 60)
        out += [line for line in done.stdout.split() if line]
    return out


def test_compose_testbed_scenario(docker_env: dict[str, str], base_image: str,
                                            tmp_path: Path) -> None:
    env = {**docker_env, "BASE_IMAGE": base_image, "PROJECT": PROJECT, "WHEELS": "1",
           "LOG_DIR": str(tmp_path), "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = shutil.which("python3") or "python3"
    done = _run([str(COMPOSE / "run-testbed.sh")], env, 1200)
    logs = tmp_path / "cdp-testbed.log"
    detail = done.stdout[-3000:] + done.stderr[-3000:]
    if logs.exists():
        detail += "\n--- compose logs (tail) ---\n" + logs.read_text()[-4000:]
    assert done.returncode == 0, detail
    out = done.stdout
    print("\n".join(line for line in out.splitlines() if line.startswith("[testbed]")))
    for line in ("write A", "matches after", "group app: wrote 1 MiB on filter (",
                 "then on filter-2 (", "group point", "both images match the filters' disks",
                 "status: group app ok, members app..filter-1, app..filter-2",
                 "rebound from source-proxy-", "write B through",
                 "during the partition", "write C held back", "healed: write C reached",
                 "health OK again", "(--point", "(--latest)", "health: OK", "all checks held"):
        assert line in out, f"{line!r} missing from the scenario's output:\n{detail}"
    assert "matches the source as it was" in out, detail
    assert _leftovers(docker_env) == []


def test_compose_testbed_etcd_variant(docker_env: dict[str, str], base_image: str,
                                      tmp_path: Path) -> None:
    env = {**docker_env, "BASE_IMAGE": base_image, "PROJECT": PROJECT_ETCD, "WHEELS": "1",
           "VARIANT": "etcd", "LOG_DIR": str(tmp_path),
           "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
    if not Path(env["PYTHON"]).exists():
        env["PYTHON"] = shutil.which("python3") or "python3"
    done = _run([str(COMPOSE / "run-testbed.sh")], env, 1200)
    logs = tmp_path / "cdp-testbed.log"
    detail = done.stdout[-3000:] + done.stderr[-3000:]
    if logs.exists():
        detail += "\n--- compose logs (tail) ---\n" + logs.read_text()[-4000:]
    assert done.returncode == 0, detail
    out = done.stdout
    print("\n".join(line for line in out.splitlines() if line.startswith("[testbed]")))
    for line in ("two coordinators on three etcd members", "leads; write A",
                 "killed the leading coordinator", "leads ", "after the kill",
                 "status through the list answers", "kept its proxies and epoch",
                 "write B under", "are still the ones", "all checks held"):
        assert line in out, f"{line!r} missing from the scenario's output:\n{detail}"
    assert _leftovers(docker_env, PROJECT_ETCD) == []
