"""The sandboxed runner against a real Docker engine (docs/contract.md §2-4).

Every restriction of §2 is proved from inside the container: a probe script prints what it
sees as ``PROBE key=value`` lines, and the tests assert on them. Every failure kind of §4 is
produced through :func:`algodock.runtime.runner.run_step`. After each test no container of this
process is left (the autouse fixture below), whatever the outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from algodock.runtime import sandbox
from algodock.contract.manifest import Manifest, parse_manifest
from algodock.runtime.engine import LABEL, MANAGED_LABEL, container_labels
from algodock.runtime.leftovers import sweep_orphans
from algodock.errors import InfrastructureError
from algodock.hashing import list_files, sha256_file
from algodock.records import InputBinding, StepRecord
from algodock.runtime.runner import run_step
from tests.conftest import build_image, unmet
from tests.loopback import bind_outside_loopback

pytestmark = pytest.mark.docker

MY_PID_LABEL = f"{LABEL}.pid={os.getpid()}"


# ------------------------------------------------------------------ helpers


def manifest(
    image: str,
    script: str | list[str],
    *,
    outputs: list[dict[str, Any]] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    parameters: dict[str, Any] | None = None,
    name: str = "t",
    **container: Any,
) -> Manifest:
    """A manifest running ``script`` with busybox ``sh -c`` (or an argv list as is)."""
    command = ["sh", "-c", script] if isinstance(script, str) else script
    doc: dict[str, Any] = {
        "manifest_version": "0.1",
        "name": name,
        "version": "1.0.0",
        "container_parameters": {"image": image, "command": command, **container},
        "inputs": inputs or [],
        "outputs": outputs or [],
    }
    if parameters is not None:
        doc["parameters"] = parameters
    return parse_manifest(doc)


class Run:
    """One run_step call with its log lines collected."""

    def __init__(self, client: Any, m: Manifest, out: Path, **kw: Any) -> None:
        self.lines: list[str] = []
        user_on_log: Callable[[str], None] | None = kw.pop("on_log", None)

        def on_log(line: str) -> None:
            self.lines.append(line)
            if user_on_log:
                user_on_log(line)

        self.out = out
        t0 = time.monotonic()
        self.result: StepRecord = run_step(m, output_dir=out, client=client, on_log=on_log, **kw)
        self.elapsed = time.monotonic() - t0

    @property
    def kind(self) -> str | None:
        return self.result.failure.kind if self.result.failure else None

    @property
    def message(self) -> str:
        return self.result.failure.message if self.result.failure else ""

    def probe(self) -> dict[str, str]:
        facts = {}
        for line in self.lines:
            if line.startswith("PROBE "):
                key, _, value = line[len("PROBE ") :].partition("=")
                facts[key] = value.strip()
        return facts


def assert_gone(client: Any, result: StepRecord) -> None:
    from docker.errors import NotFound

    assert result.container_id, "no container was created"
    with pytest.raises(NotFound):
        client.containers.get(result.container_id)


@pytest.fixture(autouse=True)
def no_container_left(docker_client: Any) -> Iterator[None]:
    """Every container this process started is removed, after success and after every failure."""
    yield
    from algodock.runtime.leftovers import list_containers, remove_container

    left = list_containers(docker_client, f"{MANAGED_LABEL}=true", MY_PID_LABEL)  # no inspect: no 404 race
    for c in left:
        remove_container(docker_client, c)
    assert not left, f"containers left behind: {[c.name for c in left]}"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


# ------------------------------------------------------------------ the probe

PROBE = r"""
p() { echo "PROBE $1=$2"; }
p uid "$(id -u)"; p gid "$(id -g)"
p sysnet "$(ls /sys/class/net | tr '\n' ' ')"
p netdev "$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
p route "$(tail -n +2 /proc/net/route | wc -l)"
nc -w 2 127.0.0.1 "$PORT" </dev/null >/dev/null 2>&1; p nc_localhost $?
nc -w 2 "$GATEWAY" "$PORT" </dev/null >/dev/null 2>&1; p nc_gateway $?
wget -q -T 2 -O /dev/null "http://$GATEWAY:$PORT/" >/dev/null 2>&1; p wget_gateway $?
for t in /probe /etc/probe /bin/probe /work/probe /work/input/probe /work/input/data/probe /work/output/probe /tmp/probe /dev/probe /dev/shm/probe /dev/mqueue/probe /run/probe /var/probe /root/probe; do
  (echo x > "$t") 2>/dev/null; p "write:$t" $?
done
(echo x > /work/algo_input.json) 2>/dev/null; p write:/work/algo_input.json $?
(echo x >> /work/input/data/data.csv) 2>/dev/null; p append:/work/input/data/data.csv $?
rm -f /work/input/data/data.csv 2>/dev/null; p rm:/work/input/data/data.csv $?
mkdir /work/newdir 2>/dev/null; p mkdir:/work/newdir $?
(echo x > /bin/busybox) 2>/dev/null; p write:/bin/busybox $?
p tmp_kb "$(df -k /tmp | tail -1 | awk '{print $2}')"
dd if=/dev/zero of=/tmp/fill bs=1M count=$((SCRATCH + 4)) 2>/dev/null; p tmp_fill $?
p tmp_fill_kb "$(du -k /tmp/fill | cut -f1)"
rm -f /tmp/fill
p output_owner "$(stat -c %u:%g /work/output)"
grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status | while read -r k v; do p "${k%:}" "$v"; done
p pids_max "$(cat /sys/fs/cgroup/pids/pids.max)"
p cfs_quota "$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"
p cfs_period "$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
p mem_limit "$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
p memsw_limit "$(cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || echo absent)"
p input_path "$ALGORITHM_INPUT_PATH"
p algo_input "$(tr -d '\n ' < "$ALGORITHM_INPUT_PATH")"
p data_inode "$(stat -c %i /work/input/data/data.csv)"
p data "$(tr '\n' ';' < /work/input/data/data.csv)"
for m in / /work/algo_input.json /work/input /work/output /tmp; do
  p "mount:$m" "$(awk -v m="$m" '$2 == m {print $4}' /proc/mounts | cut -d, -f1)"
done
"""

SCRATCH_MB = 8


class Listener:
    """A TCP server on the host's address on the Docker bridge (``gateway``), counting connections
    (none may come from the sandbox; the control with a network reaches it there)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        bind_outside_loopback(self.sock, (host, 0), why="the network probe's target: what a container with a network would reach")
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.sock.close()
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture(scope="module")
def gateway(docker_client: Any, busybox_image: str) -> str:
    """The host's address as a container on the default bridge network sees it."""
    route = docker_client.containers.run(busybox_image, ["sh", "-c", "ip route | awk '/^default/ {print $3}'"], network_mode="bridge", remove=True)
    address = route.decode().strip()
    assert address, "no default route on the bridge network"
    return address


@pytest.fixture(scope="module")
def listener(gateway: str) -> Iterator[Listener]:
    server = Listener(gateway)
    yield server
    server.close()


@pytest.fixture(scope="module")
def probe(docker_client: Any, busybox_image: str, listener: Listener, gateway: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One sandboxed run of the probe (image without USER, i.e. root): what it saw, and the host side."""
    base = tmp_path_factory.mktemp("probe")
    data = base / "data.csv"
    data.write_text("a,b\n1,2\n")
    m = manifest(
        busybox_image,
        PROBE,
        inputs=[{"name": "data", "format": "csv"}],
        parameters={"type": "object", "properties": {"n": {"type": "integer", "default": 7}}},
        env={"PORT": str(listener.port), "GATEWAY": gateway, "SCRATCH": str(SCRATCH_MB)},
        resource_request={"cpu_millicore": 500, "memory_gb": 0.25},
        scratch_mb=SCRATCH_MB,
    )
    run = Run(docker_client, m, base / "out", inputs={"data": data}, run_id="probe-run", step_id="probe-step", attempt=3)
    return {
        "facts": run.probe(),
        "run": run,
        "data": data,
        "data_inode": data.stat().st_ino,
        "out": base / "out",
        "accepted": listener.accepted,
        "lines": run.lines,
    }


def test_probe_run_succeeded(probe: dict[str, Any], busybox_image: str) -> None:
    r = probe["run"].result
    assert r.ok, r.failure
    assert r.image_id == busybox_image and r.repo_digest is None
    assert len(probe["facts"]) > 40, probe["lines"]


def test_no_network(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    assert f["sysnet"].split() == ["lo"]
    assert f["netdev"].split() == ["lo"]
    assert f["route"] == "0", "a network without routes"
    assert f["nc_localhost"] != "0", "the host's listener must not be reachable as 127.0.0.1"
    assert f["nc_gateway"] != "0" and f["wget_gateway"] != "0", "the host must not be reachable through the bridge"
    assert probe["accepted"] == 0


def test_the_network_probe_would_notice_a_network(docker_client: Any, busybox_image: str, listener: Listener, gateway: str) -> None:
    """Control: the same probe with the default bridge network does reach the host listener."""
    before = listener.accepted
    output = docker_client.containers.run(
        busybox_image,
        ["sh", "-c", f'nc -w 2 {gateway} {listener.port} </dev/null >/dev/null; echo "nc=$?"'],
        network_mode="bridge",
        remove=True,
    )
    assert b"nc=0" in output
    assert listener.accepted == before + 1


@pytest.mark.parametrize(
    "path",
    ["/probe", "/etc/probe", "/bin/probe", "/bin/busybox", "/work/probe", "/work/input/probe", "/work/input/data/probe", "/work/algo_input.json",
     "/dev/probe", "/dev/shm/probe", "/dev/mqueue/probe", "/run/probe", "/var/probe", "/root/probe"],
)
def test_read_only_everywhere_but_output_and_tmp(probe: dict[str, Any], path: str) -> None:
    assert probe["facts"][f"write:{path}"] != "0", f"{path} was writable"


def test_output_and_tmp_are_writable(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    assert f["write:/work/output/probe"] == "0" and f["write:/tmp/probe"] == "0"
    assert (probe["out"] / "probe").read_text() == "x\n"
    assert f["mount:/"] == "ro"
    assert f["mount:/work/algo_input.json"] == "ro" and f["mount:/work/input"] == "ro"
    assert f["mount:/work/output"] == "rw" and f["mount:/tmp"] == "rw"
    assert f["mkdir:/work/newdir"] != "0"


def test_inputs_are_hardlinked_and_read_only_inside(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    assert f["append:/work/input/data/data.csv"] != "0" and f["rm:/work/input/data/data.csv"] != "0"
    assert int(f["data_inode"]) == probe["data_inode"], "same inode: hardlinked, not copied"
    assert f["data"] == "a,b;1,2;", "readable"
    assert probe["data"].read_text() == "a,b\n1,2\n", "the source is untouched"
    [rec] = probe["run"].result.inputs
    assert rec.sha256 == hashlib.sha256(b"a,b\n1,2\n").hexdigest() and rec.files == ["/work/input/data/data.csv"]


def test_algo_input_as_the_container_reads_it(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    assert f["input_path"] == "/work/algo_input.json"
    doc = json.loads(f["algo_input"])
    assert doc["config"] == {"parameters": {"n": 7}}, "defaults filled before the run"
    assert doc["input_data"][0]["files"] == ["/work/input/data/data.csv"]
    assert doc["output_path"] == "/work/output" and doc["input_data_path"] == "/work/input"


def test_tmp_is_a_tmpfs_of_scratch_mb(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    assert int(f["tmp_kb"]) == SCRATCH_MB * 1024
    assert f["tmp_fill"] != "0", "writing past scratch_mb must fail"
    assert int(f["tmp_fill_kb"]) <= SCRATCH_MB * 1024


def test_never_root_and_owns_the_output(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    assert (f["uid"], f["gid"]) == (str(sandbox.UNPRIVILEGED_UID), str(sandbox.UNPRIVILEGED_UID))
    assert f["output_owner"] == f"{f['uid']}:{f['gid']}"
    st = probe["out"].stat()
    assert (st.st_uid, st.st_gid) == (sandbox.UNPRIVILEGED_UID, sandbox.UNPRIVILEGED_UID)


def test_no_capabilities_and_no_new_privileges(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(f[cap], 16) == 0, f"{cap}={f[cap]}"
    assert f["NoNewPrivs"] == "1"


def test_cgroup_limits(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    assert int(f["pids_max"]) == sandbox.PIDS_LIMIT
    assert int(f["cfs_quota"]) / int(f["cfs_period"]) == 500 / 1000
    assert int(f["mem_limit"]) == int(0.25 * 1024**3)


def test_no_swap_beyond_the_memory_limit(probe: dict[str, Any]) -> None:
    f = probe["facts"]
    if f["memsw_limit"] == "absent":  # swap accounting is off on some kernels (swapaccount=0)
        unmet("the kernel has no swap accounting (memory.memsw.limit_in_bytes), so the swap limit cannot be seen")
    assert int(f["memsw_limit"]) == int(0.25 * 1024**3), "swap equal to memory: no swap beyond the limit"


def test_pids_limit_stops_a_fork_bomb(docker_client: Any, busybox_image: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "PIDS_LIMIT", 16)
    script = "p=0; for i in $(seq 1 40); do sleep 30 & p=$((p+1)); done; echo spawned=$p; exit 0"
    run = Run(docker_client, manifest(busybox_image, script, timeout_seconds=20), out)
    assert run.kind == "exit_code", run.lines
    assert "can't fork" in run.message
    assert not any(line.startswith("spawned=") for line in run.lines)
    assert run.elapsed < 15


def test_labels_identity_and_engine_settings_while_running(docker_client: Any, busybox_image: str, out: Path) -> None:
    """Seen from a log callback while the container exists: labels, the image id, the host config."""
    seen: dict[str, Any] = {}

    def on_log(line: str) -> None:
        if line == "MARKER":
            found = docker_client.containers.list(all=True, filters={"label": f"{LABEL}.run_id=run-labels"})
            seen["containers"] = found
            if found:
                found[0].reload()
                seen["attrs"] = found[0].attrs

    m = manifest(busybox_image, "echo MARKER", resource_request={"cpu_millicore": 1500, "memory_gb": 0.5}, scratch_mb=16)
    run = Run(docker_client, m, out, run_id="run-labels", step_id="label-step", attempt=2, on_log=on_log)
    assert run.result.ok, run.result.failure
    assert len(seen["containers"]) == 1
    attrs = seen["attrs"]
    labels = attrs["Config"]["Labels"]
    assert labels[f"{LABEL}.run_id"] == "run-labels"
    assert labels[f"{LABEL}.step_id"] == "label-step"
    assert labels[f"{LABEL}.attempt"] == "2"
    assert labels[MANAGED_LABEL] == "true" and labels[f"{LABEL}.pid"] == str(os.getpid())
    assert attrs["Image"] == busybox_image and attrs["Config"]["Image"] == busybox_image, "run by id, not by tag"
    hc = attrs["HostConfig"]
    assert hc["NetworkMode"] == "none" and hc["ReadonlyRootfs"] is True
    assert hc["CapDrop"] == ["ALL"] and "no-new-privileges" in hc["SecurityOpt"]
    assert hc["NanoCpus"] == 1_500_000_000 and hc["Memory"] == hc["MemorySwap"] == 512 * 1024**2
    assert hc["PidsLimit"] == sandbox.PIDS_LIMIT and not hc.get("Privileged")
    assert "size=16m" in hc["Tmpfs"]["/tmp"]
    assert not hc.get("DeviceRequests"), "no GPU unless asked for"
    mounts = {mt["Target"]: mt for mt in hc["Mounts"]}
    assert mounts["/work/algo_input.json"]["ReadOnly"] and mounts["/work/input"]["ReadOnly"]
    assert not mounts["/work/output"].get("ReadOnly") and mounts["/work/output"]["Source"] == str(out)
    assert_gone(docker_client, run.result)


def test_gpu_becomes_a_device_request_only_when_asked(tmp_path: Path) -> None:
    cp = manifest("x:1", "true", resource_request={"gpu": 2}).container_parameters
    cfg = sandbox.container_config(cp, image_id="sha256:" + "0" * 64, user="1:1", work_dir=tmp_path, output_dir=tmp_path, labels={})
    [req] = cfg["device_requests"]
    assert req["Count"] == 2 and req["Capabilities"] == [["gpu"]]
    cp0 = manifest("x:1", "true").container_parameters
    assert "device_requests" not in sandbox.container_config(cp0, image_id="x", user="1:1", work_dir=tmp_path, output_dir=tmp_path, labels={})


# ------------------------------------------------------------------ who the container runs as

USER_PROBE = 'echo "PROBE uid=$(id -u)"; echo "PROBE gid=$(id -g)"; echo "PROBE owner=$(stat -c %u:%g /work/output)"; touch /work/output/ok'
PASSWD = (
    b"root:x:0:0:root:/root:/bin/sh\ntoor:x:0:0:another root:/root:/bin/sh\napp:x:1234:2345:app:/home/app:/bin/sh\n"
    b"zero:x:000:000:uid 0 spelt with zeros:/:/bin/sh\napp0:x:1234:0:app in the root group:/:/bin/sh\n"
)
USERS = ["0", "root", "1000", "1000:0", "app", "toor", "ghost", "0000:0000", "00", "0:0", "root:root", "zero", "app0", "4294967296"]


@pytest.fixture(scope="module")
def user_images(docker_client: Any, busybox_image: str) -> dict[str, str]:
    images = {}
    for user in USERS:
        images[user] = build_image(
            docker_client,
            f"algodock-test/user-{user.replace(':', '-')}:1",
            f"FROM {busybox_image}\nCOPY passwd /etc/passwd\nUSER {user}\n",
            {"passwd": PASSWD},
        )
    return images


@pytest.mark.parametrize(
    ("user", "uid", "gid"),
    [
        ("0", 10001, 10001),
        ("root", 10001, 10001),
        ("1000", 1000, 1000),
        ("1000:0", 1000, 1000),
        ("app", 1234, 2345),
        ("toor", 10001, 10001),
        ("ghost", 10001, 10001),
        ("0000:0000", 10001, 10001),
        ("00", 10001, 10001),
        ("0:0", 10001, 10001),
        ("root:root", 10001, 10001),
        ("zero", 10001, 10001),
        ("app0", 1234, 1234),
        ("4294967296", 10001, 10001),
    ],
    ids=["USER-0", "USER-root", "USER-1000", "USER-1000-group-0", "USER-named", "USER-name-of-uid-0", "USER-unknown-name",
         "USER-0000-0000", "USER-00", "USER-0-0", "USER-root-root", "USER-name-of-uid-000", "USER-named-in-group-0", "USER-2-to-the-32"],
)
def test_never_uid_0_whatever_the_image_says(docker_client: Any, user_images: dict[str, str], out: Path, user: str, uid: int, gid: int) -> None:
    run = Run(docker_client, manifest(user_images[user], USER_PROBE), out)
    assert run.result.ok, (run.result.failure, run.lines)
    f = run.probe()
    assert (int(f["uid"]), int(f["gid"])) == (uid, gid)
    assert f["owner"] == f"{uid}:{gid}", "the output folder belongs to the container's user"
    assert (out.stat().st_uid, out.stat().st_gid) == (uid, gid)
    assert (out / "ok").stat().st_uid == uid


def _base_image() -> str:
    path = Path(__file__).resolve().parents[1] / ".build" / "base-image"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail("CI is set but .build/base-image is missing (`make base-image`)", pytrace=False)
        pytest.skip(".build/base-image is missing (`make base-image`)")
    return path.read_text().strip()


@pytest.mark.parametrize("user", ["root", "0000:0000", "00", "0:0"])
def test_never_uid_0_on_the_base_image(docker_client: Any, out: Path, user: str) -> None:
    """A real distribution image (its own /etc/passwd, root named root) with USER spelling uid 0."""
    image = build_image(docker_client, f"algodock-test/base-user-{user.replace(':', '-')}:1", f"FROM {_base_image()}\nUSER {user}\n")
    run = Run(docker_client, manifest(image, ["sh", "-c", 'echo "PROBE uid=$(id -u)"; echo "PROBE groups=$(id -G)"; touch /work/output/ok']), out)
    assert run.result.ok, (run.result.failure, run.lines)
    f = run.probe()
    assert f["uid"] == str(sandbox.UNPRIVILEGED_UID), f"ran as uid {f['uid']}"
    assert "0" not in f["groups"].split(), f"in root's group: {f['groups']}"
    assert (out / "ok").stat().st_uid == sandbox.UNPRIVILEGED_UID


def test_a_passwd_that_is_a_symlink_runs_unprivileged(docker_client: Any, busybox_image: str, out: Path) -> None:
    """A hostile /etc/passwd (a symlink to a file naming app uid 0) must neither crash the runner nor give root."""
    image = build_image(
        docker_client,
        "algodock-test/user-passwd-symlink:1",
        f"FROM {busybox_image}\nCOPY passwd /etc/real-passwd\nRUN rm -f /etc/passwd && ln -s /etc/real-passwd /etc/passwd\nUSER app\n",
        {"passwd": b"app:x:0:0::/:/bin/sh\n"},
    )
    run = Run(docker_client, manifest(image, USER_PROBE), out)
    assert run.result.ok, (run.result.failure, run.lines)
    assert run.probe()["uid"] == str(sandbox.UNPRIVILEGED_UID)


# ------------------------------------------------------------------ failure kinds (§4)


def _create_events(client: Any, since: float, run_id: str) -> list[dict[str, Any]]:
    """The engine's own record of containers created for ``run_id`` between ``since`` and now."""
    filters = {"type": "container", "event": "create", "label": f"{LABEL}.run_id={run_id}"}
    return list(client.events(since=f"{since:.6f}", until=f"{time.time():.6f}", decode=True, filters=filters))


@pytest.mark.parametrize(
    ("inputs", "params", "expected"),
    [
        ({"data": "data.csv"}, {"n": "five"}, "parameters.n: 'five' is not of type 'integer'"),
        ({"data": "data.csv"}, {"m": 1}, "Additional properties are not allowed ('m' was unexpected)"),
        ({}, {}, "inputs.data: required input is missing"),
        ({"data": "data.csv", "other": "data.csv"}, {}, "inputs.other: the manifest declares no input slot 'other'"),
        ({"data": "absent.csv"}, {}, "inputs.data: "),
    ],
    ids=["param-type", "param-unknown", "required-input-missing", "unknown-slot", "input-path-absent"],
)
def test_invalid_input_starts_no_container(
    docker_client: Any, busybox_image: str, tmp_path: Path, inputs: dict[str, str], params: dict[str, Any], expected: str
) -> None:
    (tmp_path / "data.csv").write_text("a\n")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "default": 1}}, "additionalProperties": False}
    bindings = {k: tmp_path / v for k, v in inputs.items()}
    run_id = f"invalid-{os.urandom(4).hex()}"
    since = time.time()
    def step(image: str) -> Manifest:
        return manifest(image, "touch /work/output/ran", inputs=[{"name": "data", "format": "csv"}], parameters=schema)

    for image in (busybox_image, "algodock-test/does-not-exist:1"):  # the missing image is never even looked up
        run = Run(docker_client, step(image), tmp_path / f"out-{len(image)}", inputs=bindings, parameters=params, run_id=run_id)
        assert run.kind == "invalid_input", run.result.failure
        assert expected in run.message
        assert run.result.container_id is None and run.result.image_id is None
        assert not (tmp_path / f"out-{len(image)}" / "ran").exists()
    assert _create_events(docker_client, since, run_id) == []
    # Control: a valid run of the same step is seen by the same query.
    ok = Run(docker_client, step(busybox_image), tmp_path / "out-ok", inputs={"data": tmp_path / "data.csv"}, run_id=run_id)
    assert ok.result.ok, ok.result.failure
    assert len(_create_events(docker_client, since, run_id)) == 1


def test_non_empty_output_folder_is_invalid_input(docker_client: Any, busybox_image: str, out: Path) -> None:
    out.mkdir()
    (out / "stale.csv").write_text("old")
    run = Run(docker_client, manifest(busybox_image, "true"), out)
    assert run.kind == "invalid_input" and "is not empty" in run.message
    assert run.result.container_id is None


@pytest.mark.parametrize("image", ["algodock-test/does-not-exist:1", "sha256:" + "0" * 64, "no-such-registry.invalid/none/such@sha256:" + "1" * 64])
def test_image_not_found(docker_client: Any, out: Path, image: str) -> None:
    run = Run(docker_client, manifest(image, "true"), out)
    assert run.kind == "image_not_found", run.result.failure
    assert image in run.message
    assert run.result.container_id is None


def test_a_registry_that_refuses_connections_is_infrastructure_naming_it(docker_client: Any, out: Path) -> None:
    run = Run(docker_client, manifest("localhost:1/none/such@sha256:" + "1" * 64, "true"), out)
    assert run.kind == "infrastructure" and "registry localhost:1" in run.message, run.result.failure  # retried: it may come back
    assert run.result.container_id is None


def test_exit_code_carries_the_log_tail(docker_client: Any, busybox_image: str, out: Path) -> None:
    script = 'for i in $(seq 1 100); do echo "noise $i"; done; echo "fatal: the disk is on fire" >&2; exit 3'
    run = Run(docker_client, manifest(busybox_image, script), out)
    assert run.kind == "exit_code"
    assert run.result.exit_code == 3 and run.result.failure.exit_code == 3
    assert "exited with code 3" in run.message and "fatal: the disk is on fire" in run.message
    assert "noise 100" in run.message and "noise 1\n" not in run.message, "only the tail"
    # The engine copies stdout and stderr independently: their relative order is not kept,
    # but the last word on stderr is always in the message (see algodock/logstream.py).
    noise = [line for line in run.lines if line.startswith("noise")]
    assert noise == [f"noise {i}" for i in range(1, 101)], "stdout streamed to the logger whole and in order"
    assert run.lines.count("fatal: the disk is on fire") == 1
    assert run.result.started_at and run.result.finished_at and run.result.started_at <= run.result.finished_at
    assert_gone(docker_client, run.result)


def test_exit_0_with_a_failure_status_is_a_failure(docker_client: Any, busybox_image: str, out: Path) -> None:
    script = 'echo \'{"status": "failure", "message": "no pings in range"}\' > /work/output/algo_output.json'
    run = Run(docker_client, manifest(busybox_image, script), out)
    assert run.kind == "exit_code" and "no pings in range" in run.message
    assert run.result.exit_code == 0


def test_a_failure_status_with_a_huge_message_is_reported_shortened(docker_client: Any, busybox_image: str, out: Path) -> None:
    script = "printf '{\"status\": \"failure\", \"message\": \"%s\"}' $(head -c 900000 /dev/zero | tr '\\0' m) > /work/output/algo_output.json"
    run = Run(docker_client, manifest(busybox_image, script), out)
    assert run.kind == "exit_code" and "mmmm… (900,000 characters)" in run.message
    assert len(run.message) < 3000


def test_timeout_kills_the_container(docker_client: Any, busybox_image: str, out: Path) -> None:
    run = Run(docker_client, manifest(busybox_image, "echo started; sleep 60; echo never", timeout_seconds=1), out)
    assert run.kind == "timeout", run.result.failure
    assert "timeout_seconds=1" in run.message
    assert run.elapsed < 15, f"took {run.elapsed:.1f}s: the container was not killed"
    assert run.result.exit_code == 137, "killed, not stopped politely"
    assert run.lines == ["started"]
    assert_gone(docker_client, run.result)


@pytest.mark.parametrize(
    "hog",
    ["tail /dev/zero", "yes 0123456789abcdef | head -c 200000000 | sh -c 'x=$(cat); echo ${#x}'"],
    ids=["tail-dev-zero", "pipe-into-a-variable"],
)
def test_oom(docker_client: Any, busybox_image: str, out: Path, hog: str) -> None:
    run = Run(docker_client, manifest(busybox_image, hog, resource_request={"memory_gb": 0.0625}, timeout_seconds=60), out)
    assert run.kind == "oom", (run.result.failure, run.lines[-5:])
    assert "memory limit of 0.0625 GB" in run.message
    assert run.elapsed < 50
    assert_gone(docker_client, run.result)


ESCAPES = {
    "absolute-path": ('echo x > /work/output/v.csv; echo \'{"output_data": [{"name": "v", "format": "csv", "path": "/etc/passwd"}]}\' > /work/output/algo_output.json', "must be relative"),
    "dotdot": ('echo \'{"output_data": [{"name": "v", "format": "csv", "path": "../algo_input.json"}]}\' > /work/output/algo_output.json', "without '..'"),
    "symlink-to-etc-passwd": ('ln -s /etc/passwd /work/output/v.csv; echo \'{"output_data": [{"name": "v", "format": "csv", "path": "v.csv"}]}\' > /work/output/algo_output.json', "leads outside"),
    "symlink-to-root": ('ln -s / /work/output/v; echo \'{"output_data": [{"name": "v", "format": "csv", "path": "v"}]}\' > /work/output/algo_output.json', "leads outside"),
    "symlinked-folder-leading-out": ('ln -s /etc /work/output/d; echo \'{"output_data": [{"name": "v", "format": "csv", "path": "d/passwd"}]}\' > /work/output/algo_output.json', "leads outside"),
    "symlink-inside-a-folder-output": ("mkdir /work/output/v; echo a > /work/output/v/a.csv; ln -s /etc/shadow /work/output/v/b.csv", "v/b.csv is a symlink leading outside"),
    "symlink-loop": ("ln -s v.csv /work/output/v.csv", "dangling or looping symlink"),
    "nested-past-sense": ("for i in $(seq 1 3000); do printf '['; done > /work/output/algo_output.json", "nested deeper than 100 levels"),
    "malformed-json": ('echo \'{"output_data": [\' > /work/output/algo_output.json', "not valid JSON"),
    "algo-output-is-a-symlink": ("echo x > /work/output/v.csv; ln -s /work/algo_input.json /work/output/algo_output.json", "must be a regular file"),
    "wrong-shape": ('echo x > /work/output/v.csv; echo \'{"output_data": [{"name": "v", "format": "csv"}]}\' > /work/output/algo_output.json', "output_data.0.path"),
}


@pytest.mark.parametrize(("script", "expected"), list(ESCAPES.values()), ids=list(ESCAPES))
def test_invalid_output(docker_client: Any, busybox_image: str, out: Path, script: str, expected: str) -> None:
    run = Run(docker_client, manifest(busybox_image, script, outputs=[{"name": "v", "format": "csv"}]), out)
    assert run.kind == "invalid_output", (run.result.failure, run.lines)
    assert expected in run.message
    assert run.result.outputs == []
    assert_gone(docker_client, run.result)


def test_missing_output(docker_client: Any, busybox_image: str, out: Path) -> None:
    m = manifest(busybox_image, "echo x > /work/output/v.json", outputs=[{"name": "v", "format": "csv"}])
    run = Run(docker_client, m, out)
    assert run.kind == "missing_output"
    assert "required output 'v' was not produced" in run.message and "v.csv nor v/" in run.message
    assert_gone(docker_client, run.result)


def test_outputs_found_by_name_without_algo_output(docker_client: Any, busybox_image: str, out: Path) -> None:
    script = "echo a,b > /work/output/table.csv; mkdir -p /work/output/parts/sub; echo 1 > /work/output/parts/p0; echo 2 > /work/output/parts/sub/p1"
    outputs = [{"name": "table", "format": "csv"}, {"name": "parts", "format": "binary", "multiple": True}, {"name": "opt", "format": "json", "required": False}]
    run = Run(docker_client, manifest(busybox_image, script, outputs=outputs), out)
    assert run.result.ok, run.result.failure
    table, parts = run.result.outputs
    assert table.path == out / "table.csv" and table.sha256 == hashlib.sha256(b"a,b\n").hexdigest()
    assert parts.path == out / "parts" and parts.multiple
    listing = "".join(f"{hashlib.sha256((out / 'parts' / r).read_bytes()).hexdigest()} {len(r)}:{r}\n" for r in ["p0", "sub/p1"])  # framed
    assert list_files(out / "parts") == ["p0", "sub/p1"]
    assert parts.sha256 == hashlib.sha256(listing.encode()).hexdigest(), "the folder hash of algodock/hashing.py"


def test_parquet_output_rows_and_sha256(docker_client: Any, busybox_image: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in" / "pings.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"device": ["a"] * 321, "t": list(range(321))}), src)
    script = 'cp /work/input/pings/pings.parquet /work/output/visits-x.parquet && echo \'{"status": "success", "output_data": [{"name": "visits", "format": "parquet", "path": "visits-x.parquet"}], "metrics": {"rows": 321}, "message": "done"}\' > /work/output/algo_output.json'
    m = manifest(busybox_image, script, inputs=[{"name": "pings", "format": "parquet"}], outputs=[{"name": "visits", "format": "parquet"}])
    run = Run(docker_client, m, tmp_path / "out", inputs={"pings": InputBinding(slot="pings", path=src, uri="s3://raw/pings.parquet", produced_by="up")})
    assert run.result.ok, run.result.failure
    [o] = run.result.outputs
    assert o.rows == 321 and o.format == "parquet"
    assert o.sha256 == hashlib.sha256((tmp_path / "out" / "visits-x.parquet").read_bytes()).hexdigest() == sha256_file(src)
    assert run.result.metrics == {"rows": 321} and run.result.message == "done"
    [i] = run.result.inputs
    assert (i.uri, i.produced_by, i.sha256) == ("s3://raw/pings.parquet", "up", sha256_file(src))
    summary = run.result.step_summary()
    schema = {"columns": [{"name": "device", "type": "string", "nullable": True}, {"name": "t", "type": "int64", "nullable": True}], "extra_columns": "allow"}
    assert summary["outputs"] == [{"name": "visits", "uri": str(o.path), "sha256": o.sha256, "format": "parquet", "rows": 321, "schema": schema}]  # read from its footer


def test_infrastructure_when_the_engine_is_unreachable(busybox_image: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from algodock.runtime.engine import docker_client as connect

    with pytest.raises(InfrastructureError, match="No Docker engine answers at unix:///nonexistent.sock"):
        connect("unix:///nonexistent.sock")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    result = run_step(manifest(busybox_image, "true"), output_dir=out)
    assert result.failure is not None and result.failure.kind == "infrastructure"
    assert result.failure.retryable
    assert "nonexistent.sock" in result.failure.message


# ------------------------------------------------------------------ cleanup and logs


def test_sweep_removes_containers_of_dead_processes_only(docker_client: Any, busybox_image: str) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan_labels = {**container_labels("crashed-run", "s", 1), f"{LABEL}.pid": str(dead.pid), f"{LABEL}.pid_start": "1"}
    live_labels = container_labels("live-run", "s", 1)
    orphan = docker_client.containers.create(busybox_image, ["true"], labels=orphan_labels)
    live = docker_client.containers.create(busybox_image, ["true"], labels=live_labels)
    try:
        removed = sweep_orphans(docker_client)
        assert orphan.name in removed and live.name not in removed
        from algodock.runtime.leftovers import list_containers

        names = {c.name for c in list_containers(docker_client, f"{MANAGED_LABEL}=true")}  # other sessions remove theirs meanwhile
        assert orphan.name not in names and live.name in names
    finally:
        for c in (orphan, live):
            try:
                c.remove(force=True)
            except Exception:
                pass


def test_log_flood_is_bounded_in_memory_and_whole_on_disk(docker_client: Any, busybox_image: str, tmp_path: Path) -> None:
    size = 50_000_000
    line = b"0123456789012345678901234567890123456789\n"
    script = f"yes 0123456789012345678901234567890123456789 | head -c {size}; echo; echo the-end"
    log_path = tmp_path / "logs" / "step.log"
    emit_limit = 256 * 1024
    run = Run(docker_client, manifest(busybox_image, script), tmp_path / "out", log_path=log_path, emit_limit=emit_limit)
    assert run.result.ok, run.result.failure
    shown = sum(len(s) + 1 for s in run.lines[:-1])
    assert shown <= emit_limit + len(line) and len(run.lines) < emit_limit // len(line) + 10
    assert run.lines[-1].startswith(f"[algodock] log output past {emit_limit} bytes is not shown here; the full log is in {log_path}")
    assert run.result.log_tail[-1] == "the-end", "the tail is still kept"
    expected = hashlib.sha256()
    whole, rest = divmod(size, len(line))
    for _ in range(whole // 1000):
        expected.update(line * 1000)
    expected.update(line * (whole % 1000) + line[:rest] + b"\nthe-end\n")
    assert log_path.stat().st_size == size + len(b"\nthe-end\n")
    assert sha256_file(log_path) == expected.hexdigest(), "the log file has every byte"


# ------------------------------------------------------------------ the log pump, without an engine


def _pump(chunks: list[Any], **kw: Any) -> tuple[Any, list[str]]:
    from algodock.runtime.logs import LogPump

    lines: list[str] = []
    pump = LogPump(iter(chunks), on_line=lines.append, **kw).start()
    assert pump.join(10)
    assert pump.error is None
    return pump, lines


def test_log_pump_keeps_stderr_apart_for_the_failure_message() -> None:
    chunks: list[Any] = [(None, b"fatal: bad input\n")] + [(f"line {i}\n".encode(), None) for i in range(50)]
    pump, lines = _pump(chunks)
    assert lines[0] == "fatal: bad input" and lines[-1] == "line 49"
    assert "fatal: bad input" not in pump.tail(20), "arrived early: out of the combined tail"
    assert pump.stderr_tail() == ["fatal: bad input"]
    assert pump.total == len(b"fatal: bad input\n") + sum(len(f"line {i}\n") for i in range(50))


def test_log_pump_splits_lines_across_chunks_and_bounds_long_ones(tmp_path: Path) -> None:
    from algodock.runtime.logs import MAX_LINE

    huge = b"x" * (3 * MAX_LINE)
    pump, lines = _pump([b"hel", b"lo\nwor", b"ld\n", huge[: MAX_LINE + 5], huge[MAX_LINE + 5 :], b"\nend"], log_path=tmp_path / "l.log")
    assert lines[:2] == ["hello", "world"]
    assert len(lines[2]) <= MAX_LINE
    assert lines[3] == "end", "a last line without newline is still emitted"
    assert (tmp_path / "l.log").read_bytes() == b"hello\nworld\n" + huge + b"\nend"


def test_log_pump_stops_emitting_at_the_limit_but_keeps_the_tail() -> None:
    chunks = [b"0123456789\n" * 100 for _ in range(100)]  # 110 kB
    pump, lines = _pump([*chunks, b"last words\n"], emit_limit=5_000)
    assert len(lines) <= 5_000 // 11 + 2
    assert lines[-1].startswith("[algodock] log output past 5000 bytes is not shown here")
    assert pump.tail(1) == ["last words"]
    assert pump.total == 110_000 + len(b"last words\n")


def test_a_gpu_request_on_an_engine_without_gpus_says_so(tmp_path: Path, docker_client, busybox_image: str) -> None:
    if "nvidia" in (docker_client.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime: the GPU request would be honoured")
    from algodock.contract.manifest import parse_manifest

    m = parse_manifest({"manifest_version": "0.1", "name": "gpu", "version": "1",
                        "container_parameters": {"image": busybox_image, "command": ["true"], "resource_request": {"gpu": 1}}})
    result = run_step(m, output_dir=tmp_path / "out", client=docker_client)
    assert result.failure is not None and result.failure.kind == "infrastructure"
    assert "asks for 1 GPU(s)" in result.failure.message
    assert not docker_client.containers.list(all=True, filters={"label": "io.algodock.step_id=gpu"})


def test_log_pump_sends_at_most_20000_lines_then_says_where_the_log_is(tmp_path: Path) -> None:
    chunks = [b"".join(b"line %d\n" % (i * 1000 + j) for j in range(1000)) for i in range(50)]  # 50,000 short lines
    pump, lines = _pump(chunks, emit_limit=10**9, log_path=tmp_path / "c.log", log_location="s3://bucket/runs/r/steps/s/container.log")
    assert len(lines) == 20_001
    assert lines[:2] == ["line 0", "line 1"] and lines[19_999] == "line 19999"
    assert lines[-1] == "[algodock] log output past 20000 lines is not shown here; the full log is in s3://bucket/runs/r/steps/s/container.log"
    assert pump.tail(1) == ["line 49999"]
    assert (tmp_path / "c.log").read_bytes() == b"".join(chunks), "under 64 MiB the stored log is whole"


def test_a_slow_log_callback_does_not_hold_up_the_stream() -> None:
    from algodock.runtime.logs import LogPump

    release = threading.Event()
    got: list[str] = []
    released: list[bool] = []  # whether the stuck logger was let go (True) or gave up waiting (False)

    def stuck(line: str) -> None:  # a logger whose API stopped answering, at its first line
        got.append(line)
        if not released:
            released.append(release.wait(30))

    chunks = [b"x\n" * 10_000 for _ in range(20)]
    pump = LogPump(iter(chunks), on_line=stuck).start()
    assert pump.join(10, drain_seconds=0.5)
    assert pump.total == 20 * 20_000, "the stream was read to its end while the callback was stuck"
    release.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (got and got[-1].startswith("[algodock]")):
        time.sleep(0.01)
    assert got[-1].startswith("[algodock] the log callback fell behind"), got[-3:]
    # join returned while the logger was still stuck (it was let go only after join): join
    # waits for the stream, and only drain_seconds for the callback.
    assert released[0] is True, "join waited for the stuck callback"
    assert len(got) <= 20_001


@pytest.mark.parametrize(("total", "keep"), [(10, 300), (299, 300), (1000, 300), (100_000, 1000), (10_007, 257)])
def test_bounded_log_keeps_head_and_tail(tmp_path: Path, total: int, keep: int) -> None:
    import random
    import re

    from algodock.runtime.logs import BoundedLog

    data = bytes(random.Random(total).randrange(256) for _ in range(total))
    log = BoundedLog(tmp_path / "l.log", max_bytes=keep)
    pos = 0
    rng = random.Random(keep)
    while pos < total:  # chunks of every size, some larger than the ring
        n = rng.choice([1, 7, 64, keep // 2, keep * 2])
        log.write(data[pos : pos + n])
        pos += n
    log.close()
    stored = (tmp_path / "l.log").read_bytes()
    assert not (tmp_path / "l.log.tail").exists()
    if total <= keep - 256:
        assert stored == data
        return
    m = re.search(rb"\n\[algodock\] (\d+) bytes of log dropped here \(the stored log keeps the first (\d+) and the last (\d+) of (\d+) bytes\)\n", stored)
    if m is None:  # nothing dropped: head and tail joined
        assert stored == data
        return
    dropped, head, tail, whole = map(int, m.groups())
    assert whole == total and head + tail + dropped == total
    assert len(stored) <= keep
    assert stored[: m.start()] == data[:head] and stored[m.end() :] == data[total - tail :]


def test_a_200_mb_flood_of_short_lines_is_capped_and_does_not_slow_the_step(docker_client: Any, busybox_image: str, tmp_path: Path) -> None:
    exited: list[float] = []
    log_path = tmp_path / "container.log"
    m = manifest(busybox_image, "yes 0123456789 | head -c 200000000; echo; echo flood-done", timeout_seconds=300)
    run = Run(docker_client, m, tmp_path / "out", log_path=log_path, emit_limit=10**9, on_exit=lambda: exited.append(time.monotonic()))
    returned = time.monotonic()
    assert run.result.ok, run.result.failure
    assert exited, "the container's exit was reported"  # the time a flood adds to a step: bench/log_flood.py
    assert len(run.lines) == 20_001 and run.lines[-1].startswith("[algodock] log output past 20000 lines is not shown here")
    assert log_path.stat().st_size <= 64 * 1024 * 1024
    stored = log_path.read_bytes()
    assert stored.startswith(b"0123456789\n") and stored.endswith(b"\nflood-done\n")
    assert b" bytes of log dropped here" in stored
    print(f"\n200 MB flood: {run.elapsed:.1f} s in all, returned {returned - exited[0]:.2f} s after the exit")


# ------------------------------------------------------------------ output limits while the container runs


class PeakWatcher:
    """Samples what an output folder holds on the host while a step runs: the disk's own view."""

    def __init__(self, root: Path) -> None:
        from algodock.runtime.limits import measure

        self.peak = 0
        self._stop = threading.Event()

        def watch() -> None:
            while not self._stop.is_set():
                if root.exists():
                    self.peak = max(self.peak, measure(root).bytes)
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.peak


MB = 1024 * 1024


def test_writing_3_gb_with_output_mb_100_is_stopped_as_disk_limit(docker_client: Any, busybox_image: str, out: Path) -> None:
    peak = PeakWatcher(out)
    script = "dd if=/dev/zero of=/work/output/big bs=1M count=3000 2>&1; echo wrote-it-all"
    run = Run(docker_client, manifest(busybox_image, script, output_mb=100, timeout_seconds=120), out)
    most = peak.stop()
    assert run.kind == "disk_limit", (run.result.failure, run.lines[-3:])
    assert "output_mb=100" in run.message
    assert "wrote-it-all" not in run.lines, "stopped while it ran"
    print(f"\noutput_mb=100: the host held at most {most / MB:.0f} MiB (slack {max(0, most - 100 * MB) / MB:.0f} MiB)")
    # README ("Output limits"): a writer at page-cache speed (GB/s) is stopped within its limit plus
    # what it writes while the watcher looks and kills (bench/output_limit.py measures it alone;
    # here, on a loaded machine, 100-180 MiB were seen). Over 100: the sampler saw the folder past
    # the limit, so the lower bound shows the sampler works; the upper one fails when the watcher
    # rests too long or the kill lands late (before the fix a loaded engine saw 335 MiB here).
    assert 100 * MB < most <= 200 * MB, f"the host held {most / MB:.0f} MiB; the README promises at most 2 x output_mb"
    assert run.result.outputs == []
    assert_gone(docker_client, run.result)


def test_the_output_watcher_kills_every_process_of_the_container_from_this_host(docker_client: Any, busybox_image: str, tmp_path: Path) -> None:
    """The disk-limit kill does not wait for the engine: the watcher finds the container's cgroup
    on this host (no engine call) and SIGKILLs its processes. Here the engine's kill does nothing
    and no pid is given: only the host kill can stop the container, whose writer goes past
    10 MiB and then sleeps (without the host kill it would wait 600 s)."""
    from algodock.runtime.limits import OutputLimits, OutputWatcher

    folder = tmp_path / "output"
    folder.mkdir()
    container = docker_client.containers.create(
        busybox_image, ["sh", "-c", "dd if=/dev/zero of=/out/big bs=1M count=30 2>/dev/null; sleep 600 & wait"],
        volumes={str(folder): {"bind": "/out", "mode": "rw"}}, network_mode="none", labels=container_labels("host-kill", "host-kill", 1),
    )
    engine_kills: list[str] = []
    watcher = OutputWatcher(folder, OutputLimits.of(10, 100), kill=lambda: engine_kills.append("kill"), container_id=container.id).start()
    try:
        container.start()
        status = container.wait(timeout=60)["StatusCode"]
    finally:
        watcher.stop()
        container.remove(force=True)
    assert watcher.failure is not None and engine_kills == ["kill"]
    assert status == 137, f"exit status {status}: not killed by SIGKILL"


def test_too_many_files_is_disk_limit(docker_client: Any, busybox_image: str, out: Path) -> None:
    script = "i=0; while [ $i -lt 200000 ]; do : > /work/output/f$i; i=$((i+1)); done; echo made-them-all"
    run = Run(docker_client, manifest(busybox_image, script, output_files=500, timeout_seconds=120), out)
    assert run.kind == "disk_limit", (run.result.failure, run.lines[-3:])
    assert "output_files=500" in run.message
    assert "made-them-all" not in run.lines
    assert sum(1 for _ in out.iterdir()) < 50_000


@pytest.mark.parametrize(
    "script",
    [
        "dd if=/dev/zero of=/work/output/big bs=1M count=150 2>/dev/null",  # quicker than one watcher interval
        "dd if=/dev/zero of=/work/output/sparse bs=1 count=1 seek=200M 2>/dev/null",  # 4 KiB on disk, 200 MiB when read
        "mkdir -p /work/output/a/b/c && dd if=/dev/zero of=/work/output/a/b/c/deep bs=1M count=150 2>/dev/null",
    ],
    ids=["fast-then-exit", "sparse-file", "deep-folder"],
)
def test_over_the_limit_at_exit_is_disk_limit(docker_client: Any, busybox_image: str, out: Path, script: str) -> None:
    run = Run(docker_client, manifest(busybox_image, script, output_mb=100, outputs=[{"name": "big", "format": "binary", "required": False}]), out)
    assert run.kind == "disk_limit", (run.result.failure, run.lines[-3:])


def test_under_the_limits_succeeds(docker_client: Any, busybox_image: str, out: Path) -> None:
    script = "dd if=/dev/zero of=/work/output/big.binary bs=1M count=20 2>/dev/null; for i in 1 2 3; do : > /work/output/f$i; done"
    run = Run(docker_client, manifest(busybox_image, script, output_mb=25, output_files=4, outputs=[{"name": "big", "format": "binary"}]), out)
    assert run.result.ok, run.result.failure


def test_volume_mode_output_over_the_limit_is_disk_limit(docker_client: Any, busybox_image: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Named-volume staging: checked when the output is read back, which stops at the limit."""
    monkeypatch.setenv("ALGODOCK_STAGING", "volume")
    run_id = f"vol-{uuid.uuid4().hex[:12]}"
    labelled = {"filters": {"label": f"{LABEL}.run_id={run_id}"}}  # the step's volumes carry the run's labels
    while_it_ran: list[str] = []  # the same filter, before the clean-up: it finds the step's two volumes
    peak = PeakWatcher(out)
    run = Run(docker_client, manifest(busybox_image, "dd if=/dev/zero of=/work/output/big bs=1M count=300 2>/dev/null", output_mb=50), out,
              run_id=run_id, on_exit=lambda: while_it_ran.extend(v.name for v in docker_client.volumes.list(**labelled)))
    most = peak.stop()
    assert run.kind == "disk_limit", (run.result.failure, run.lines[-3:])
    assert most <= 60 * MB, f"the host took {most / MB:.0f} MiB while reading the output back"
    assert len(while_it_ran) == 2, f"the step's work and output volumes, labelled run_id={run_id}: {while_it_ran}"
    assert not docker_client.volumes.list(**labelled), "the step's volumes were left behind"


def test_shm_mb_gives_a_writable_dev_shm_of_that_size(docker_client: Any, busybox_image: str, out: Path) -> None:
    script = 'echo "PROBE shm_kb=$(df -k /dev/shm | tail -1 | awk \'{print $2}\')"; (echo x > /dev/shm/probe) 2>/dev/null; echo "PROBE shm_write=$?"'
    run = Run(docker_client, manifest(busybox_image, script, shm_mb=32), out)
    assert run.result.ok, run.result.failure
    f = run.probe()
    assert f["shm_write"] == "0" and int(f["shm_kb"]) == 32 * 1024
    # shm_mb 0 (the default): no writable /dev/shm, as the probe above checks for every path


# ------------------------------------------------------------------ every way a step ends is a failure kind


class _CreateThenLoseTheAnswer:
    """A real client whose ``api.create_container`` makes the container, then reports a timeout (a lost answer)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.created: list[str] = []
        outer = self

        class Api:
            def __getattr__(self, name: str) -> Any:
                return getattr(client.api, name)

            def create_container(self, *args: Any, **kwargs: Any) -> Any:
                from requests.exceptions import ReadTimeout

                outer.created.append(client.api.create_container(*args, **kwargs)["Id"])
                raise ReadTimeout("read timed out (injected after the engine created the container)")

        self.api = Api()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_a_container_created_when_the_call_timed_out_is_still_removed(docker_client: Any, busybox_image: str, out: Path) -> None:
    from docker.errors import NotFound

    client = _CreateThenLoseTheAnswer(docker_client)
    result = run_step(manifest(busybox_image, "true"), output_dir=out, client=client, run_id="lost-create")
    assert result.failure is not None and result.failure.kind == "infrastructure", result.failure
    assert len(client.created) == 1
    with pytest.raises(NotFound):
        docker_client.containers.get(client.created[0])


@pytest.mark.parametrize("hook", ["before_start", "on_exit"])
def test_a_failing_hook_is_a_failure_kind_not_a_traceback(docker_client: Any, busybox_image: str, out: Path, hook: str) -> None:
    def boom() -> None:
        raise RuntimeError("the pool broke")

    result = run_step(manifest(busybox_image, "true"), output_dir=out, client=docker_client, **{hook: boom})
    assert result.failure is not None and result.failure.kind == "infrastructure"
    assert "the pool broke" in result.failure.message
    assert_gone(docker_client, result)


def test_an_unreadable_output_is_the_algorithms_fault() -> None:
    from algodock.runtime.runner import _as_failure

    denied = PermissionError(13, "Permission denied", "/out/v.csv")
    assert _as_failure(denied, reading_outputs=True).kind == "invalid_output"
    assert "/out/v.csv" in _as_failure(denied, reading_outputs=True).message
    assert _as_failure(denied, reading_outputs=False).kind == "infrastructure"
    from requests.exceptions import ConnectionError

    assert _as_failure(ConnectionError("engine gone"), reading_outputs=True).kind == "infrastructure", "an OSError subclass, but the engine's"


def test_one_client_reuses_its_connections_across_steps_but_never_an_attach_stream(busybox_image: str, tmp_path: Path) -> None:
    """One pool per engine socket: steps running at once on one client (as a pipeline runs them)
    reuse connections; the connection a container's attach stream took over is never reused (a
    request written on it gets no answer: the step would hang until the client's timeout and
    leave its container behind)."""
    from concurrent.futures import ThreadPoolExecutor

    from algodock.runtime.engine import SHARED_POOL, docker_client

    client = docker_client(timeout=20)
    try:
        m = manifest(busybox_image, "echo hello")
        with ThreadPoolExecutor(8) as pool:
            runs = list(pool.map(lambda i: Run(client, m, tmp_path / f"out{i}"), range(24)))
        for run in runs:
            assert run.result.status == "succeeded", run.message
            assert run.lines == ["hello"]
            assert_gone(client, run.result)
        shared = client.api.adapters["http+docker://"].pools.get(SHARED_POOL)
        # each step asks create, attach, start, wait, inspect and remove through the shared pool
        assert shared.num_requests >= 24 * 6 and shared.num_connections <= 24, (shared.num_requests, shared.num_connections)
    finally:
        client.close()
