"""A real private registry for the tests: Debian's ``docker-registry`` (`make registry`) on
127.0.0.1 with htpasswd basic auth, its storage and config in a temporary folder.

The engine trusts it without TLS: dockerd allows plain HTTP to 127.0.0.0/8 registries by
default (``docker info`` lists ``127.0.0.0/8`` under Insecure Registries).
Its access log (:meth:`Registry.blob_fetches`) is how the tests and the bench count what was
pulled.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

REGISTRY_BIN = "/usr/bin/docker-registry"
HTPASSWD_BIN = "/usr/bin/htpasswd"
USER = "algoteam"


def available() -> str | None:
    """None when the registry can be started here, else why not."""
    for path in (REGISTRY_BIN, HTPASSWD_BIN):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (`make registry` installs Debian's docker-registry and apache2-utils)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """One registry process; :meth:`stop` and :meth:`start` again keep its port and its images."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.password = f"pw-{uuid.uuid4().hex}"  # unique: a test searches every file for it
        self.log_path = folder / "registry.log"
        self.proc: subprocess.Popen | None = None
        (folder / "data").mkdir(parents=True, exist_ok=True)
        subprocess.run([HTPASSWD_BIN, "-Bbc", str(folder / "htpasswd"), USER, self.password], check=True, capture_output=True)
        (folder / "config.yml").write_text(
            "version: 0.1\n"
            "log: {level: info, accesslog: {disabled: false}}\n"
            f"storage: {{filesystem: {{rootdirectory: {folder / 'data'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: '127.0.0.1:{self.port}'}}\n"
            f"auth: {{htpasswd: {{realm: algodock-test, path: {folder / 'htpasswd'}}}}}\n"
        )

    def start(self) -> Registry:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(self.folder / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)  # polling the port: the process gives no other sign it listens
        raise RuntimeError(f"docker-registry did not listen on {self.host} within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def auth(self) -> dict[str, str]:
        return {"username": USER, "password": self.password}

    def push(self, client: Any, image_id: str, name: str, tag: str) -> str:
        """Tag ``image_id`` as ``<host>/<name>:<tag>``, push it, drop the local tag; returns the pushed digest."""
        repo = f"{self.host}/{name}"
        client.api.tag(image_id, repo, tag)
        digest = ""
        for event in client.api.push(repo, tag, stream=True, decode=True, auth_config=self.auth()):
            if event.get("error"):
                raise RuntimeError(f"push {repo}:{tag}: {event['error']}")
            found = re.search(r"digest: (sha256:[0-9a-f]{64})", str(event.get("status") or ""))
            if found:
                digest = found.group(1)
        assert digest, f"push {repo}:{tag} reported no digest"
        return digest

    def blob_fetches(self, name: str) -> list[tuple[str, int]]:
        """``(digest, bytes)`` of every successful blob download of repository ``name``, from the access log."""
        pattern = re.compile(rf'"GET /v2/{re.escape(name)}/blobs/(sha256:[0-9a-f]{{64}}) HTTP/[0-9.]+" 200 (\d+)')
        return [(m.group(1), int(m.group(2))) for m in pattern.finditer(self.log_path.read_text(errors="replace"))]


def remove_local(client: Any, *refs: str) -> None:
    """Remove local images by reference (the engine is shared: only what a test made)."""
    for ref in refs:
        try:
            client.images.remove(ref, force=True)
        except Exception:  # already gone
            pass


def clean(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
