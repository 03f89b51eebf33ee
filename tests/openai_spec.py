"""Responses checked against OpenAI's OpenAPI spec (tests/data/openai-openapi, pinned).

`SpecCheckedApp` wraps a server's ASGI app (server_harness.RunningServer does): every body
it sends on an OpenAI route, each streamed chunk, and every error body is validated against
the spec's schema before the response's last byte leaves, so a test that made a response
cannot have finished before its check. Violations are collected here; conftest.py fails the
test that produced them.

The spec is taken as OpenAI's API behaves where the two differ (each patch says where):
- some 3.1 schemas still mark null with 3.0's `nullable: true`, which a 3.1 validator
  ignores: it is read as "or null", as OpenAI means it;
- a completions stream chunk has `finish_reason: null` until its choice ends, and an echoed
  prompt's first token has null in `token_logprobs` and `top_logprobs`, as OpenAI's legacy
  completions (and vLLM, and lm-evaluation-harness reading them) do.
"""

import copy
import json
import threading
from pathlib import Path

import yaml
from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).parent / "data" / "openai-openapi" / "openapi-trimmed.yaml"
_BASE = "urn:openai-openapi"


def _read_nullable_as_or_null(node):
    if isinstance(node, dict):
        node = {key: _read_nullable_as_or_null(value) for key, value in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_read_nullable_as_or_null(item) for item in node]
    return node


def _or_null(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _load() -> dict:
    spec = _read_nullable_as_or_null(yaml.safe_load(SPEC_PATH.read_text()))
    schemas = spec["components"]["schemas"]
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]
    logprobs = choice["properties"]["logprobs"]["anyOf"][0]["properties"]
    logprobs["token_logprobs"]["items"] = _or_null(logprobs["token_logprobs"]["items"])
    logprobs["top_logprobs"]["items"] = _or_null(logprobs["top_logprobs"]["items"])
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    finish = chunk["properties"]["choices"]["items"]["properties"]
    finish["finish_reason"] = _or_null(finish["finish_reason"])
    schemas["CreateCompletionStreamChunk"] = chunk  # ropeway's name, for the patched copy
    return spec


SPEC = _load()
_REGISTRY = Registry().with_resource(_BASE, Resource.from_contents(SPEC, default_specification=DRAFT202012))
_VALIDATORS: dict[str, OAS31Validator] = {}


def validator(schema_name: str) -> OAS31Validator:
    if schema_name not in _VALIDATORS:
        _VALIDATORS[schema_name] = OAS31Validator({"$ref": f"{_BASE}#/components/schemas/{schema_name}"},
                                                  registry=_REGISTRY)
    return _VALIDATORS[schema_name]


def problems(schema_name: str, body) -> list[str]:
    return [f"{schema_name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator(schema_name).iter_errors(body)]


# (method, route) -> (schema of a whole body, schema of a streamed chunk)
_ROUTES = {
    ("POST", "/v1/completions"): ("CreateCompletionResponse", "CreateCompletionStreamChunk"),
    ("POST", "/v1/chat/completions"): ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    ("GET", "/v1/models"): ("ListModelsResponse", None),
}


def _schemas_of(method: str, path: str) -> tuple[str | None, str | None]:
    if method == "GET" and path.startswith("/v1/models/"):
        return "Model", None
    return _ROUTES.get((method, path), (None, None))


def response_problems(method: str, path: str, status: int, content_type: str, body: bytes) -> list[str]:
    whole, chunk = _schemas_of(method, path)
    if content_type.startswith("text/event-stream"):
        found = []
        for line in body.decode().splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = json.loads(line.removeprefix("data: "))
            found += problems("ErrorResponse" if "error" in frame else chunk, frame)
        return found
    if not content_type.startswith("application/json"):
        return []
    if status >= 400:
        return problems("ErrorResponse", json.loads(body))
    return problems(whole, json.loads(body)) if whole else []


_violations: list[str] = []
_lock = threading.Lock()


def take_violations() -> list[str]:
    with _lock:
        found = list(_violations)
        _violations.clear()
    return found


class SpecCheckedApp:
    """ASGI wrapper: validates each response on an OpenAI route before its last byte is sent."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started: dict = {}
        body = bytearray()

        async def checked_send(message):
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    self._check(scope, started, bytes(body))
            await send(message)

        await self.app(scope, receive, checked_send)

    @staticmethod
    def _check(scope, started: dict, body: bytes) -> None:
        headers = {key.decode().lower(): value.decode() for key, value in started.get("headers", [])}
        method, path, status = scope["method"], scope["path"], started.get("status", 0)
        if not body:
            return
        try:
            found = response_problems(method, path, status, headers.get("content-type", ""), body)
        except ValueError as error:  # not JSON where JSON was promised
            found = [f"unparsable body: {error}"]
        if found:
            with _lock:
                _violations.extend(f"{method} {path} {status}: {p}" for p in found)
