"""The replayer's HTTP-level errors: a status and a JSON body, raised by handlers and helpers alike."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """Answer `status` with JSON `{"error": code, **fields}`. Messages never carry payloads or secrets."""

    def __init__(self, status: int, code: str, message: str = "", **fields: Any) -> None:
        super().__init__(message or code)
        self.status = status
        self.body: dict[str, Any] = {"error": code, **({"message": message} if message else {}), **fields}
