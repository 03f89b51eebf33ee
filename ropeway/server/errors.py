"""Every failure as OpenAI's error object: {"error": {"message", "type", "param", "code"}}.

FastAPI's own 422 for a body that does not fit the schema becomes a 400, as OpenAI
answers; an unexpected exception becomes a 500 whose body names no internals (the
traceback goes to the server log only).
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ropeway.engine import EngineDeadError
from ropeway.sampling_params import InvalidParameter

from .protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("ropeway.server")

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=_TYPE_OF_STATUS.get(self.status, "server_error"),
                           param=self.param, code=self.code)

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> "APIError":
        return cls(400, message, param=param)

    @classmethod
    def from_invalid_parameter(cls, error: InvalidParameter) -> "APIError":
        return cls(400, str(error), param=error.param)


def error_response(error: APIError) -> JSONResponse:
    body = ErrorResponse(error=error.detail())
    return JSONResponse(body.model_dump(), status_code=error.status, headers=error.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_field_step(part) -> bool:
    # pydantic puts the tried member of a union into the location ("str", "list[int]",
    # "TextPart", "function-after[...]"); our field names are lower snake_case.
    return isinstance(part, int) or (part.isidentifier() and part.islower() and part not in _TYPE_TAGS)


def _field_path(location: tuple) -> str | None:
    # ("body", "messages", 0, "role") -> "messages.0.role"; the leading "body" says nothing.
    parts = [str(part) for part in location[1:] if _is_field_step(part)]
    return ".".join(parts) or None


def validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError.bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    location = tuple(first.get("loc", ()))
    if location == ("body",) and first.get("type") == "missing":
        return APIError.bad_request("the request has no body; send a JSON object", "body")
    param = _field_path(location)
    message = first.get("msg", "invalid value")
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return APIError.bad_request(f"{param}: {message}{suffix}" if param else f"{message}{suffix}", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(_: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(InvalidParameter)
    async def on_invalid_parameter(_: Request, error: InvalidParameter):
        return error_response(APIError.from_invalid_parameter(error))

    @app.exception_handler(EngineDeadError)
    async def on_engine_dead(_: Request, error: EngineDeadError):
        return error_response(APIError(503, "the engine is not running"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, error: RequestValidationError):
        return error_response(validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException):
        return error_response(APIError(error.status_code, str(error.detail), headers=error.headers))

    app.add_middleware(ContainUnexpectedErrors)


class ContainUnexpectedErrors:
    """ASGI middleware: an unexpected exception becomes a 500 and stays here. (Starlette's own
    handler for Exception re-raises after answering, and uvicorn then drops the connection.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        response_started = False

        async def send_and_note(message):
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            log.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            if not response_started:
                response = error_response(APIError(500, "internal server error; the server log has the details"))
                await response(scope, receive, send)
