"""Requests to the engine that the docker SDK's public methods cannot make as algodock needs them.

The SDK's ``APIClient`` is a ``requests.Session``: these ask through its public ``get``/``post``
with its public ``base_url``, ``api_version`` and ``timeout``, and raise the SDK's own errors,
so no private SDK attribute (``_get``, ``_url``, ``_raise_for_status``...) is used.
"""

from __future__ import annotations

from typing import Any


def api_url(api: Any, path: str, *args: str) -> str:
    """The engine URL of ``path`` (``{0}``... filled with ``args``, quoted), at the client's API version."""
    from urllib.parse import quote_plus

    return f"{api.base_url}/v{api.api_version}{path.format(*map(quote_plus, args))}"


def raise_for_engine_status(res: Any) -> None:
    """Raise the docker SDK's own error (``NotFound``, ``APIError``...) for an engine response that is not a success."""
    from docker.errors import create_api_error_from_http_exception
    from requests.exceptions import HTTPError

    try:
        res.raise_for_status()
    except HTTPError as exc:
        create_api_error_from_http_exception(exc)  # always raises


def archive_response(api: Any, container_id: str, path: str) -> Any:
    """The engine's streamed ``GET /containers/{id}/archive`` response for ``path``, not yet checked.

    The SDK's ``get_archive`` hides the response (so it cannot be closed half-read, and an
    abandoned stream keeps the container busy) and lifts the read timeout; this asks through
    the ``requests.Session`` the ``APIClient`` is, with the client's own timeout.
    """
    return api.get(api_url(api, "/containers/{0}/archive", container_id), params={"path": path}, stream=True, timeout=api.timeout)
