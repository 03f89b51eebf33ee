"""/openapi.json as the server answers: FastAPI's generated schema, corrected where it differs.

- Errors are 400 (not FastAPI's 422) and every route lists the error statuses it can answer,
  each an OpenAI error object.
- /health answers 200 with no body (503 with an error when the engine is down); /metrics is
  Prometheus text; completions and chat completions stream as text/event-stream.
- What the server checks that pydantic's schema cannot say: prompts are non-empty, token ids lie
  in the vocabulary, stop lists are bounded, /tokenize takes exactly one of prompt and
  messages, and a tool's parameters are a JSON schema of type object. (That tool_choice names a
  tool, and tool messages answer a call before them, only the 400 says.)
schemathesis (`--checks all`, .ci/run) holds the server to this schema.
"""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ropeway.request_bounds import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

from .protocol import ErrorResponse, RequestBody

_GENERATION_ERRORS = (400, 401, 404, 413, 500, 503)
ERROR_STATUSES = {
    "/v1/completions": _GENERATION_ERRORS,
    "/v1/chat/completions": _GENERATION_ERRORS,
    "/v1/models": (401,),
    "/v1/models/{model_id}": (401, 404),
    "/tokenize": (400, 401, 404, 413),
    "/detokenize": (400, 401, 404, 413),
    "/health": (503,),
}
_ERROR_DESCRIPTIONS = {
    400: "Invalid request: the error's `param` names the field", 401: "Missing or incorrect API key",
    404: "Unknown model", 413: "Request body over --max-request-bytes", 500: "The request failed in the server",
    503: "The engine is not running, or its queue is full (then with Retry-After)",
}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def install_openapi(app: FastAPI, vocab_size: int) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _correct(schema, vocab_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _correct(schema: dict, vocab_size: int) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in ERROR_STATUSES.get(path, ()):
                responses[str(status)] = {"description": _ERROR_DESCRIPTIONS[status],
                                          "content": {"application/json": {"schema": _ERROR_REF}}}
    schema["paths"]["/health"]["get"]["responses"]["200"] = {"description": "The engine is running (no body)"}
    schema["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text exposition",
        "content": {"text/plain": {"schema": {"type": "string"}}}}
    for path in ("/v1/completions", "/v1/chat/completions"):
        ok = schema["paths"][path]["post"]["responses"]["200"]
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"},
                                              "description": "With `stream`: data frames, then `data: [DONE]`"}
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    token_ids = {"type": "array", "items": token_id, "minItems": 1}
    text = {"type": "string", "minLength": 1}
    components["CompletionRequest"]["properties"]["prompt"] = {
        "anyOf": [text, {"type": "array", "items": text, "minItems": 1}, token_ids,
                  {"type": "array", "items": token_ids, "minItems": 1}],
        "description": "A string, strings, token ids, or lists of token ids; none empty"}
    components["DetokenizeRequest"]["properties"]["tokens"] = {"type": "array", "items": token_id}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = components[name]["properties"]
        stop_string = {"type": "string", "maxLength": MAX_STOP_STRING_CHARS}
        properties["stop"] = {"anyOf": [stop_string, {"type": "array", "items": stop_string,
                                                      "maxItems": MAX_STOP_STRINGS}, {"type": "null"}]}
        properties["stop_token_ids"] = {"anyOf": [{"type": "array", "items": token_id,
                                                   "maxItems": MAX_STOP_TOKEN_IDS}, {"type": "null"}]}
    components["FunctionDefinition"]["properties"]["parameters"] = {"anyOf": [
        {"type": "object", "properties": {"type": {"const": "object"}}, "required": ["type"],
         "additionalProperties": True}, {"type": "null"}]}
    _null_means_unset(components)
    components["TokenizeRequest"]["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]


def _request_models(cls=RequestBody) -> set[str]:
    return {name for sub in cls.__subclasses__() for name in (sub.__name__, *_request_models(sub))}


def _null_means_unset(components: dict) -> None:
    """A request field sent as null is read as left out (protocol.RequestBody): say so for every
    optional field of every request model."""
    for name in _request_models() & components.keys():
        model = components[name]
        required = set(model.get("required", ()))
        for field, schema in model.get("properties", {}).items():
            if field in required or _allows_null(schema):
                continue
            described = {key: schema.pop(key) for key in ("title", "description", "default") if key in schema}
            model["properties"][field] = {"anyOf": [schema, {"type": "null"}], **described}


def _allows_null(schema: dict) -> bool:
    return schema.get("type") == "null" or any(_allows_null(option) for option in schema.get("anyOf", ()))
