"""The starlette app factory, the small routes (models, health, version, metrics, tokenize) and
authentication.

``create_app(engine, config)`` builds everything per app: the Prometheus registry, the server
state, the routes. The app serves a ready engine; it does not own the engine's lifetime (the
CLI starts it before serving and shuts it down after).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import secrets

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from core.errors import EngineDeadError
from frontend.async_llm import AsyncLLM
from frontend.server import ServerConfig
from frontend.server.chat import create_chat_completion
from frontend.server.completions import create_completion
from frontend.server.errors import APIError, bad_request
from frontend.server.metrics import CONTENT_TYPE, ServerMetrics
from frontend.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
    decode_request,
)
from frontend.server.serving import ServerState, encode_json, render_chat_prompt

logger = logging.getLogger(__name__)

# Paths that need the API key when one is set; /health, /metrics, /version and /tokenize stay
# open, as in vLLM, so probes and scrapers need no secret.
_GUARDED_PREFIXES = ("/v1/",)


def create_app(engine: AsyncLLM, config: ServerConfig) -> Starlette:
    state = ServerState(engine=engine, config=config, metrics=ServerMetrics(config.model_name))
    engine.stats_listeners.append(state.metrics.on_scheduler_stats)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    middleware = [Middleware(APIKeyMiddleware, api_keys=config.api_keys)] if config.api_keys else []
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            EngineDeadError: _engine_dead,
            Exception: _internal_error,
        },
    )
    app.state.server = state
    return app


# ------------------------------------------------------------------------------------ routes


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    await state.engine.check_health()  # EngineDeadError -> 503
    return Response(status_code=200)


async def version(request: Request) -> Response:
    try:
        number = importlib.metadata.version("pagedserve")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        number = "0+unknown"
    return encode_json(VersionResponse(version=number))


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    cards = [
        ModelCard(id=name, created=state.created, root=state.config.model, max_model_len=state.max_model_len)
        for name in state.config.served_model_names
    ]
    return encode_json(ModelList(data=cards))


async def tokenize(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = decode_request(await request.body(), TokenizeRequest)
    state.check_model(body.model)
    body.check_supported()
    tokenizer = state.require_tokenizer()
    if body.prompt is not None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        token_ids = tokenizer.encode(body.prompt, add_special_tokens=add_special)
    else:
        assert body.messages is not None
        token_ids = render_chat_prompt(
            tokenizer,
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template=body.chat_template,
            chat_template_kwargs=body.chat_template_kwargs,
            add_special_tokens=bool(body.add_special_tokens),
        ).token_ids
    token_strs = list(tokenizer.hf.convert_ids_to_tokens(token_ids)) if body.return_token_strs else None
    return encode_json(
        TokenizeResponse(
            count=len(token_ids), max_model_len=state.max_model_len, tokens=token_ids, token_strs=token_strs
        )
    )


async def detokenize(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = decode_request(await request.body(), DetokenizeRequest)
    state.check_model(body.model)
    tokenizer = state.require_tokenizer()
    bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise bad_request(
            f"tokens has id {bad}, outside the vocabulary [0, {tokenizer.vocab_size}).", "tokens"
        )
    return encode_json(DetokenizeResponse(prompt=tokenizer.decode(body.tokens)))


# ------------------------------------------------------------------------------------ errors


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own refusals (unknown path, wrong method) in the OpenAI shape too.
    assert isinstance(exc, HTTPException)
    response = APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").to_response()
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _engine_dead(request: Request, exc: Exception) -> Response:
    return APIError(503, f"The engine is not running: {exc}").to_response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error serving %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"Internal server error: {type(exc).__name__}").to_response()


# ------------------------------------------------------------------------------------ auth


class APIKeyMiddleware:
    """Bearer-key check for the /v1 routes (pure ASGI, so streaming passes through untouched).

    Keys are compared as SHA-256 digests with ``secrets.compare_digest``: constant time, and the
    same length whatever the client sends.
    """

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not _guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        accepted = False
        for known in self._digests:  # no early exit: the time does not depend on which key matched
            accepted |= secrets.compare_digest(digest, known)
        if scheme.lower() == "bearer" and accepted:
            await self.app(scope, receive, send)
            return
        error = APIError(401, "Invalid or missing API key; send it as 'Authorization: Bearer <key>'.")
        await error.to_response()(scope, receive, send)


def _guarded(path: str) -> bool:
    return path == "/v1" or path.startswith(_GUARDED_PREFIXES)
