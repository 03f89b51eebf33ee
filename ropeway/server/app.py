"""The FastAPI application: OpenAI-compatible routes plus health, metrics, tokenizer routes and the chat page."""

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .chat import chat_prompt_ids, create_chat_completion
from .chat_page import install_chat_page
from .completions import create_completion
from .context import ServerContext
from .errors import APIError, error_response, install_error_handlers
from .guards import LimitRequestSize, RequireAPIKey
from .http10 import WholeRepliesForHTTP10
from .openapi import install_openapi
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard,
                       ModelList, TokenizeRequest, TokenizeResponse)


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="ropeway", description="OpenAI-compatible long-context inference server.")
    app.state.ropeway = ctx
    install_error_handlers(app)

    api = APIRouter()

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(ctx, body, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(ctx, body, request)

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, created=ctx.created, root=ctx.model_name, max_model_len=ctx.max_model_len,
                         trained_context_len=ctx.trained_context_len, context_policy=ctx.default_context_policy)

    @api.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[model_card(name) for name in ctx.settings.served_model_names])

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        # (:path: a served name may hold slashes, as "org/model" names do.)
        ctx.resolve_model(model_id)  # the 404 of every route for a model this server does not serve
        return model_card(model_id)

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ctx.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError.bad_request("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            tokens = await chat_prompt_ids(ctx, body.messages, body.add_generation_prompt)
        else:
            tokens = await ctx.tokenizers.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=list(tokens), count=len(tokens), max_model_len=ctx.max_model_len)

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        ctx.resolve_model(body.model)
        ctx.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(body.tokens))

    app.include_router(api)

    @app.get("/health")
    async def health() -> Response:
        if ctx.engine.is_alive:
            return Response(status_code=200)
        return error_response(APIError(503, ctx.engine.fatal or "the engine is not running"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    install_chat_page(app)
    install_openapi(app, ctx.engine.info.vocab_size)
    # The outermost run first: the key, then the body's size, before any of the body is read.
    app.add_middleware(WholeRepliesForHTTP10)
    app.add_middleware(LimitRequestSize, max_bytes=ctx.settings.max_request_bytes)
    app.add_middleware(RequireAPIKey, api_key=ctx.settings.api_key)
    return app
