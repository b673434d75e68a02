"""Removing containers, and finding and sweeping what steps left behind, by their labels.

Every container (and staging volume) algodock makes carries the labels of
:func:`algodock.runtime.engine.container_labels`: the run, step and attempt it is for, the
Prefect flow run, and the process that owns it (host, pid, pid start time). This module is the
one place that removes a container (:func:`remove_container`) and the one place that finds and
removes leftovers by those labels (:func:`sweep`); what each caller sweeps is a choice of labels:

* :func:`sweep_orphans`: every algodock container and volume whose owning process on this host
  is gone (a crashed or killed earlier run or worker);
* :func:`kill_run_containers`: every container of a run or of a Prefect flow run, owner alive or
  not (a cancelled or crashed flow run);
* ``sweep(client, run_id=..., dead_owners_only=True)``: a dead earlier writer of one run (resume).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Literal, NamedTuple

from algodock.runtime.engine import FLOW_RUN_LABEL, LABEL, MANAGED_LABEL, _owner_alive

if TYPE_CHECKING:
    import docker

log = logging.getLogger("algodock.runtime.leftovers")

REMOVE_ATTEMPTS = 5
"""Tries a step makes to remove its own container (backing off 0.25 s, 0.5 s, ...) before leaving it to the sweep."""

Removal = Literal["removed", "gone", "failed"]
"""What :func:`remove_container` did: removed it, found it already gone (or being removed by
someone else, and then gone), or could not remove it (the sweep removes it later)."""


class ContainerRef(NamedTuple):
    """A container (or volume) as the engine's list call gives it (no per-container inspect, so a
    container removed meanwhile by someone else cannot make the listing fail)."""

    id: str
    name: str
    labels: dict[str, str]


def list_containers(client: docker.DockerClient, *labels: str) -> list[ContainerRef]:
    """Every container, running or not, carrying all of ``labels`` (``key=value`` filters)."""
    rows = client.api.containers(all=True, filters={"label": list(labels)})
    return [ContainerRef(r["Id"], (r.get("Names") or ["/" + r["Id"][:12]])[0].lstrip("/"), r.get("Labels") or {}) for r in rows]


def list_volumes(client: docker.DockerClient, *labels: str) -> list[ContainerRef]:
    """Every volume carrying all of ``labels`` (named-volume staging makes them)."""
    rows = client.api.volumes(filters={"label": list(labels)}).get("Volumes") or []
    return [ContainerRef(r["Name"], r["Name"], r.get("Labels") or {}) for r in rows]


def remove_container(client: docker.DockerClient, container: str | ContainerRef, *, attempts: int = 1) -> Removal:
    """Force-remove ``container`` (a ref, an id or a name) with its anonymous volumes; never raises.

    Up to ``attempts`` tries while the engine is unreachable or refuses (backing off 0.25 s,
    0.5 s, ...); a removal already in progress elsewhere is waited for. ``"failed"`` leaves the
    container to the sweep (its labels), once the engine answers again and its owner is gone.
    """
    from docker.errors import APIError, NotFound

    target, name = (container.id, container.name) if isinstance(container, ContainerRef) else (container, container)
    delay = 0.25
    problem: Exception | None = None
    for attempt in range(attempts):
        try:
            client.api.remove_container(target, force=True, v=True)
            return "removed"
        except NotFound:
            return "gone"
        except APIError as exc:
            if exc.status_code == 409 and "already in progress" in str(exc):
                return "gone" if _gone(client, target) else "failed"
            problem = exc
        except Exception as exc:  # the engine is gone or restarting; a clean-up never hides a step's outcome
            problem = exc
        if attempt < attempts - 1:
            time.sleep(delay)  # back off: the engine may be restarting
            delay *= 2
    log.warning("could not remove container %s (%s); the orphan sweep of the next algodock run removes it", name, problem)
    return "failed"


def remove_volume(client: docker.DockerClient, name: str) -> Removal:
    """Force-remove the volume ``name``; never raises."""
    from docker.errors import NotFound

    try:
        client.api.remove_volume(name, force=True)
        return "removed"
    except NotFound:
        return "gone"
    except Exception as exc:  # in use, or the engine went away: the sweep gets it later
        log.debug("could not remove volume %s: %s", name, exc)
        return "failed"


def _gone(client: docker.DockerClient, container: str, seconds: float = 10) -> bool:
    """Poll until another removal of ``container`` has finished (True) or ``seconds`` passed."""
    from docker.errors import NotFound

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client.api.inspect_container(container)
        except NotFound:
            return True
        except Exception:  # the engine went away: the sweep takes over
            return False
        time.sleep(0.05)
    return False


def leftover_filters(
    *, run_id: str | None = None, step_id: str | None = None, attempt: int | None = None, flow_run_id: str | None = None
) -> list[str]:
    """The label filters that pick algodock's containers of a run, step, attempt or flow run (all given must match)."""
    filters = [f"{MANAGED_LABEL}=true"]
    for key, value in ((f"{LABEL}.run_id", run_id), (f"{LABEL}.step_id", step_id), (f"{LABEL}.attempt", attempt), (FLOW_RUN_LABEL, flow_run_id)):
        if value is not None:
            filters.append(f"{key}={value}")
    return filters


def sweep(
    client: docker.DockerClient,
    *,
    run_id: str | None = None,
    step_id: str | None = None,
    attempt: int | None = None,
    flow_run_id: str | None = None,
    dead_owners_only: bool = True,
    volumes: bool = False,
) -> list[ContainerRef]:
    """Remove algodock's containers (and with ``volumes``, staging volumes) matching the labels given.

    ``dead_owners_only``: only those whose owning process on this host is gone (another host's
    are never judged from here); otherwise every match, running or not (a cancelled run).
    Returns what this call removed (one a concurrent sweep removed first is not counted).
    """
    filters = leftover_filters(run_id=run_id, step_id=step_id, attempt=attempt, flow_run_id=flow_run_id)
    removed = [
        c for c in list_containers(client, *filters)
        if not (dead_owners_only and _owner_alive(c.labels)) and remove_container(client, c) == "removed"
    ]
    if volumes:
        removed += [
            v for v in list_volumes(client, *filters)
            if not (dead_owners_only and _owner_alive(v.labels)) and remove_volume(client, v.name) == "removed"
        ]
    return removed


def sweep_orphans(client: docker.DockerClient) -> list[str]:
    """Remove algodock containers and staging volumes on this host whose owning process is gone; return their names."""
    removed = sweep(client, volumes=True)
    for c in removed:
        if c.id != c.name:  # a container (a volume's id is its name)
            log.warning("removed container %s left by a crashed run (%s)", c.name, c.labels.get(f"{LABEL}.run_id"))
    return [c.name for c in removed]


_swept: set[int] = set()


def sweep_orphans_once(client: docker.DockerClient) -> None:
    """:func:`sweep_orphans` the first time this process uses ``client`` (the runner calls it before each step)."""
    if id(client) not in _swept:
        _swept.add(id(client))
        sweep_orphans(client)


def kill_run_containers(client: docker.DockerClient, run_id: str | None = None, *, flow_run_id: str | None = None) -> list[str]:
    """Kill and remove every container of ``run_id``, or of the Prefect flow run ``flow_run_id`` (used when a flow run is cancelled)."""
    if not (flow_run_id or run_id):
        return []  # no labels would mean every algodock container: never
    refs = sweep(client, flow_run_id=flow_run_id, dead_owners_only=False) if flow_run_id else sweep(client, run_id=run_id, dead_owners_only=False)
    return [c.name for c in refs]
