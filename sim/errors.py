"""Kubernetes ``Status`` errors, raised anywhere in a request and rendered by the server."""

from __future__ import annotations

from typing import Any

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
            406: "NotAcceptable", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
            500: "InternalError"}


class ApiError(Exception):
    def __init__(self, code: int, message: str, *, reason: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "")
        self.details = details

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": self.message}
        if self.reason:
            doc["reason"] = self.reason
        if self.details is not None:
            doc["details"] = self.details
        doc["code"] = self.code
        return doc


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    what = f"{resource}.{group}" if group else resource
    details: dict[str, Any] = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return ApiError(404, f'{what} "{name}" not found', details=details)


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    what = f"{resource}.{group}" if group else resource
    details: dict[str, Any] = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return ApiError(409, f'{what} "{name}" already exists', reason="AlreadyExists", details=details)


def conflict(resource: str, name: str, group: str = "") -> ApiError:
    what = f"{resource}.{group}" if group else resource
    details: dict[str, Any] = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return ApiError(409, f'Operation cannot be fulfilled on {what} "{name}": the object has been modified; '
                         "please apply your changes to the latest version and try again", details=details)


def invalid(kind: str, name: str, causes: list[dict[str, str]], group: str = "") -> ApiError:
    """422 Invalid; each cause is {reason, message, field} as the real field.ErrorList renders."""
    parts = [f"{c['field']}: {c['message']}" for c in causes]
    msg = f'{kind}.{group} "{name}" is invalid: ' if group else f'{kind} "{name}" is invalid: '
    msg += parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    details: dict[str, Any] = {"name": name, "kind": kind, "causes": causes}
    if group:
        details["group"] = group
    return ApiError(422, msg, details=details)


def not_found_resource() -> ApiError:
    return ApiError(404, "the server could not find the requested resource", details={})


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)
