"""A small client for the service, on httpx.

    from app.client import Client
    with Client("http://127.0.0.1:8000", api_key="...") as client:
        edit = client.edit("Danielle Darrieux", "The mother tongue of {subject} is", "English")
        client.wait(edit["id"])
        print(client.generate("The mother tongue of Danielle Darrieux is")["text"])
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx


class ServiceError(Exception):
    def __init__(self, status: int, reason: str, body: Any = None):
        super().__init__(f"{status}: {reason}")
        self.status, self.reason, self.body = status, reason, body


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 120.0,
        http: httpx.Client | None = None,
    ):
        """`http` is an existing httpx.Client (e.g. FastAPI's TestClient) to send through."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self.headers = headers

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs) -> Any:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        response = self.http.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                reason = body.get("reason", response.text)
            except ValueError:
                body, reason = None, response.text
            raise ServiceError(response.status_code, reason, body)
        return response.json()

    # ----- edits -----
    def edit(
        self, subject: str, relation: str, object: str, idempotency_key: str | None = None, **options
    ) -> dict:
        """Queues one edit; options: rephrases, locality/portability [{prompt, answer}], mode."""
        body = {"subject": subject, "relation": relation, "object": object, **options}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/edits", json=body, headers=headers)

    def edits(self, edits: list[dict], idempotency_key: str | None = None) -> list[dict]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/edits", json=edits, headers=headers)["edits"]

    def get_edit(self, edit_id: int) -> dict:
        return self._call("GET", f"/edits/{edit_id}")

    def list_edits(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        params = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
        return self._call("GET", "/edits", params=params)

    def wait(self, edit_id: int, timeout: float = 300.0, interval: float = 0.2) -> dict:
        """Polls until the edit is applied or failed."""
        deadline = time.monotonic() + timeout
        while True:
            edit = self.get_edit(edit_id)
            if edit["status"] in ("applied", "failed"):
                return edit
            if time.monotonic() > deadline:
                raise TimeoutError(f"edit {edit_id} still {edit['status']} after {timeout} s")
            time.sleep(interval)

    def metrics(self, edit_id: int, version: str | int | None = None) -> dict:
        params = {"version": str(version)} if version is not None else {}
        return self._call("GET", f"/edits/{edit_id}/metrics", params=params)

    # ----- generation -----
    def generate(self, prompt: str, max_new_tokens: int = 32, **options) -> dict:
        """options: temperature, top_p, seed, version."""
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, **options}
        return self._call("POST", "/generate", json=body)

    def stream(self, prompt: str, max_new_tokens: int = 32, **options) -> Iterator[str]:
        """Yields text pieces as the server generates them."""
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "stream": True, **options}
        with self.http.stream("POST", "/generate", json=body, headers=self.headers) as response:
            if response.status_code >= 400:
                response.read()
                raise ServiceError(response.status_code, response.json().get("reason", response.text))
            event = "message"
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "message":
                    yield json.loads(line.split(":", 1)[1])["token"]

    # ----- versions -----
    def versions(self, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/versions", params={"limit": limit, "offset": offset})

    def version(self, version_id: int) -> dict:
        return self._call("GET", f"/versions/{version_id}")

    def restore(self, version_id: int) -> dict:
        """Waits (up to the server's RESTORE_WAIT_S) and returns the restore; status `queued` if it
        is not done by then (follow it with `restore_status`)."""
        return self._call("POST", f"/versions/{version_id}/restore", json={})

    def restore_status(self, restore_id: int) -> dict:
        return self._call("GET", f"/restores/{restore_id}")

    # ----- health -----
    def health(self) -> dict:
        return self._call("GET", "/health")

    def ready(self) -> bool:
        try:
            return self.http.get("/ready").status_code == 200
        except httpx.TransportError:  # not listening yet
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not ready after {timeout} s")
            time.sleep(0.2)
