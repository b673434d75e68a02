"""The sandbox of docs/contract.md §2 as one pure function from a manifest to engine arguments.

Everything that restricts an algorithm lives here, so a reader can audit it in one place:
no network, read-only root, a ``/tmp`` tmpfs (and ``/dev/shm`` only when ``shm_mb`` > 0), never uid 0, no capabilities,
``no-new-privileges``, a pids limit, a CPU quota, memory with swap equal to it, GPUs only
when asked for, and no log kept by the engine (the runner reads output as it comes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from algodock.contract.manifest import ALGO_INPUT_PATH, INPUT_DIR, OUTPUT_DIR, ContainerParameters

UNPRIVILEGED_UID = int(os.environ.get("ALGODOCK_UID", "10001"))
"""The uid an image runs as when it names no non-root USER."""
PIDS_LIMIT = int(os.environ.get("ALGODOCK_PIDS_LIMIT", "512"))
ROOT_NAMES = {"", "root"}
MAX_ID = 2**31 - 1
"""Larger numeric ids are refused: an engine may wrap them (2**32 is uid 0 once truncated to 32 bits)."""


@dataclass(frozen=True)
class RunAs:
    """Who the container runs as."""

    user: str
    """Passed to the engine: ``uid:gid`` or the image's user name."""
    uid: int | None
    """Numeric uid that must own the output folder; None until a named user is looked up."""
    gid: int | None


def _numeric(text: str) -> int | None:
    """``text`` as an id when it is one (ASCII digits only: ``"00"`` is 0), else None."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _unprivileged() -> RunAs:
    return RunAs(f"{UNPRIVILEGED_UID}:{UNPRIVILEGED_UID}", UNPRIVILEGED_UID, UNPRIVILEGED_UID)


def _group(group: str, default: int) -> int:
    """The numeric group asked for, unless it is root's (0) or not a number: then ``default``."""
    gid = _numeric(group)
    return gid if gid is not None and 0 < gid <= MAX_ID else default


def run_as(image_user: str) -> RunAs:
    """Decide the user from the image's ``USER``: its own when non-root, else the unprivileged uid.

    The test is numeric: ``0``, ``00``, ``0000:0000`` and ``root`` are all uid 0. A name is
    looked up later in the image's ``/etc/passwd`` (:func:`lookup_user`).

    >>> run_as("0").user, run_as("0000:0000").user, run_as("root:root").user, run_as("1000").user, run_as("app").uid
    ('10001:10001', '10001:10001', '10001:10001', '1000:1000', None)
    """
    name, _, group = image_user.partition(":")
    uid = _numeric(name)
    if name.strip() in ROOT_NAMES or uid == 0 or (uid is not None and uid > MAX_ID):
        return _unprivileged()
    if uid is not None:
        gid = _group(group, uid)
        return RunAs(f"{uid}:{gid}", uid, gid)
    return RunAs(image_user, None, None)


def lookup_user(passwd: str, image_user: str) -> RunAs | None:
    """Resolve a named ``USER`` with the image's ``/etc/passwd``; None when unknown or root (uid 0, however spelt).

    >>> lookup_user("toor:x:000:0::/:/bin/sh\napp:x:1234:2345::/:/bin/sh\n", "toor") is None
    True
    >>> lookup_user("app:x:1234:2345::/:/bin/sh\n", "app").user
    '1234:2345'
    """
    name, _, group = image_user.partition(":")
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name:  # the first entry wins, as getpwnam's does
            uid, gid = _numeric(fields[2]), _numeric(fields[3])
            if uid is None or uid == 0 or uid > MAX_ID:
                return None
            gid = gid if gid is not None and 0 < gid <= MAX_ID else uid
            gid = _group(group, gid)
            return RunAs(f"{uid}:{gid}", uid, gid)
    return None


def container_config(
    params: ContainerParameters,
    *,
    image_id: str,
    user: str,
    work_dir: Path,
    output_dir: Path,
    labels: dict[str, str],
    name: str | None = None,
    mounts: list[Any] | None = None,
    descriptor_path: str = ALGO_INPUT_PATH,
) -> dict[str, Any]:
    """Keyword arguments for ``client.containers.create`` (docker SDK) of a sandboxed step.

    ``mounts`` replaces the bind mounts of ``work_dir`` and ``output_dir`` (named-volume staging).
    ``descriptor_path`` is where ``algo_input.json`` is mounted and what ``ALGORITHM_INPUT_PATH``
    says (only ``algodock check-image`` moves it; bind mounts only).
    """
    from docker.types import DeviceRequest, LogConfig, Mount

    rr = params.resource_request
    memory = rr.memory_bytes
    config: dict[str, Any] = {
        "image": image_id,
        "command": list(params.command),
        "user": user,
        "environment": {**params.env, "ALGORITHM_INPUT_PATH": descriptor_path, "HOME": "/tmp"},
        "labels": labels,
        "name": name,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {
            "/tmp": f"rw,nosuid,nodev,size={params.scratch_mb}m,mode=1777",
            "/dev/mqueue": "ro,nosuid,nodev,noexec,size=4k",  # hides the engine's writable POSIX queues
            # shm_mb > 0: POSIX shared memory on request; tmpfs pages are charged to the container's memory.
            **({"/dev/shm": f"rw,nosuid,nodev,noexec,size={params.shm_mb}m,mode=1777"} if params.shm_mb > 0 else {}),
        },
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": PIDS_LIMIT,
        "nano_cpus": rr.cpu_millicore * 1_000_000,
        "mem_limit": memory,
        "memswap_limit": memory,
        # No engine /dev/shm (only the tmpfs above, when shm_mb > 0) and a read-only /dev/mqueue.
        "ipc_mode": "none",
        "mounts": mounts
        or [
            Mount(descriptor_path, str(work_dir / "algo_input.json"), type="bind", read_only=True),
            Mount(INPUT_DIR, str(work_dir / "input"), type="bind", read_only=True),
            Mount(OUTPUT_DIR, str(output_dir), type="bind", read_only=False),
        ],
        # The runner reads output through attach as it comes and keeps it (log_path); a second
        # copy by the engine's json-file driver would slow a log flood about sevenfold.
        "log_config": LogConfig(type="none"),
        "detach": True,
    }
    if rr.gpu > 0:
        config["device_requests"] = [DeviceRequest(count=rr.gpu, capabilities=[["gpu"]])]
    return config


CREATE_KEYS = ("image", "command", "user", "environment", "labels", "name", "detach")
"""The keys of a :func:`container_config` that go to the container's config; the rest make its host config."""


def create_container_args(api: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the low-level ``APIClient.create_container`` of ``cfg`` (a :func:`container_config`).

    The SDK's high-level ``containers.create`` makes the same split and then inspects the new
    container to return a model; a step needs only its id, so it creates through the
    low-level client and saves that engine call.
    """
    create = {key: cfg[key] for key in CREATE_KEYS if key in cfg}
    create["host_config"] = api.create_host_config(**{key: value for key, value in cfg.items() if key not in CREATE_KEYS})
    return create


def docker_run_argv(cfg: dict[str, Any], *, remove: bool = True) -> list[str]:
    """The ``docker run`` command line equivalent to ``cfg`` (a :func:`container_config`).

    For people and benches that want the very same sandbox outside algodock: the raw
    ``docker run`` baseline of ``bench/`` is built from this, never from a second list of
    flags.
    """
    argv = ["docker", "run"]
    if remove:
        argv.append("--rm")
    argv += ["--user", cfg["user"], "--network", cfg["network_mode"], "--ipc", cfg["ipc_mode"]]
    if cfg.get("read_only"):
        argv.append("--read-only")
    for path, opts in cfg.get("tmpfs", {}).items():
        argv += ["--tmpfs", f"{path}:{opts}"]
    for cap in cfg.get("cap_drop", []):
        argv += ["--cap-drop", cap]
    for opt in cfg.get("security_opt", []):
        argv += ["--security-opt", opt]
    argv += ["--pids-limit", str(cfg["pids_limit"]), "--cpus", f"{cfg['nano_cpus'] / 1e9:g}"]
    argv += ["--memory", f"{cfg['mem_limit']}b", "--memory-swap", f"{cfg['memswap_limit']}b"]
    for key, value in cfg.get("environment", {}).items():
        argv += ["--env", f"{key}={value}"]
    for key, value in cfg.get("labels", {}).items():
        argv += ["--label", f"{key}={value}"]
    for m in cfg.get("mounts", []):
        argv += ["--mount", f"type={m['Type']},source={m['Source']},target={m['Target']}" + (",readonly" if m.get("ReadOnly") else "")]
    for request in cfg.get("device_requests", []) or []:
        argv += ["--gpus", "all" if request.count == -1 else str(request.count)]
    log_config = cfg.get("log_config")
    if log_config is not None:
        argv += ["--log-driver", log_config.type]
        for key, value in (log_config.config or {}).items():
            argv += ["--log-opt", f"{key}={value}"]
    return argv + [cfg["image"], *cfg["command"]]
