"""Calling a test server: its key and one JSON call that returns (status, body)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

KEY = "test-key-123"


def call(
    url: str,
    body: bytes | dict | None = None,
    key: str | None = KEY,
    timeout: float = 120,
    method: str | None = None,
) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text
