"""The decode node's FastAPI application: OpenAI routes plus health, metrics and usage."""
from __future__ import annotations

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from pd.decode.serving_chat import create_chat_completion
from pd.decode.serving_completion import create_completion
from pd.decode.state import NodeState
from pd.openai.errors import BodySizeLimitMiddleware, OpenAIError, bad_request, install_error_handlers
from pd.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                TokenizeRequest)
from pd.openai.responses import (EmbeddingData, EmbeddingResponse, EmbeddingUsage, ModelCard, ModelList,
                                 encode_embedding)

DEFAULT_MAX_BODY_BYTES = 8 << 20


def create_app(state: NodeState, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="pdserve decode node", docs_url=None, redoc_url=None)
    app.state.node = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)

    app.add_middleware(ErrorCounter, metrics=state.metrics)

    def auth(request: Request) -> str | None:
        return state.authenticate(request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, api_key: str | None = Depends(auth)):
        return await create_chat_completion(state, body, api_key, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, api_key: str | None = Depends(auth)):
        return await create_completion(state, body, api_key, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, api_key: str | None = Depends(auth)):
        return await create_embeddings(state, body)

    @app.get("/v1/models")
    async def models(api_key: str | None = Depends(auth)):
        return ModelList(data=[ModelCard(id=state.model_name, created=state.created,
                                         max_model_len=state.max_model_len)])

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, api_key: str | None = Depends(auth)):
        state.check_model(body.model)
        if body.messages is not None:
            msgs = [m.to_template_dict(i) for i, m in enumerate(body.messages)]
            try:
                ids = state.tokenizer.encode_chat(msgs, add_generation_prompt=body.add_generation_prompt)
            except ValueError as exc:
                raise bad_request(f"could not apply the chat template: {exc}", param="messages") from None
        else:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, api_key: str | None = Depends(auth)):
        state.check_model(body.model)
        vocab = state.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.get("/v1/usage")
    async def usage(session_id: str = Query(..., min_length=1, max_length=256),
                    api_key: str | None = Depends(auth)):
        return await session_usage(state, api_key, session_id)

    @app.get("/health")
    async def health():
        ok = state.engine.is_running and not state.draining
        return JSONResponse({"status": "ok" if ok else "unavailable", "role": state.role},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def create_embeddings(state: NodeState, body: EmbeddingRequest) -> EmbeddingResponse:
    state.check_model(body.model)
    state.check_capacity()
    data, total = [], 0
    for i, item in enumerate(body.inputs()):
        ids = state.tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids or len(ids) > state.max_model_len:
            raise bad_request(f"input[{i}] has {len(ids)} tokens; it must have 1 to {state.max_model_len}",
                              param="input")
        vocab = state.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise bad_request(f"input[{i}] has token ids outside [0, {vocab})", param="input")
        try:
            hidden = await state.engine.call(lambda e, ids=ids: e.embed(ids))
        except MemoryError as exc:
            raise OpenAIError(503, str(exc)) from None
        vec = hidden.float().mean(dim=0) if body.embedding_type == "mean" else hidden[-1].float()
        vec = torch.nn.functional.normalize(vec, dim=0)
        data.append(EmbeddingData(index=i, embedding=encode_embedding(vec.tolist(), body.encoding_format)))
        total += len(ids)
    return EmbeddingResponse(data=data, model=state.model_name,
                             usage=EmbeddingUsage(prompt_tokens=total, total_tokens=total))


async def session_usage(state: NodeState, api_key: str | None, session_id: str) -> dict:
    info = state.sessions.get(api_key, session_id)
    if info is None:
        raise OpenAIError(404, f"session {session_id!r} is not known to this server", param="session_id")

    def read(engine):
        stats = engine.stats()
        session = engine.scheduler.sessions.get(info.engine_key)
        return stats, (len(session.token_ids) if session else 0)

    stats, resident_tokens = await state.engine.call(read)
    return {
        "session_id": session_id, "turns": info.turns,
        "prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens,
        "total_tokens": info.total_tokens, "cached_tokens": info.cached_tokens,
        "max_model_len": state.max_model_len,
        "kv_tokens_used": (stats.num_blocks - stats.num_free_blocks) * stats.block_size,
        "kv_tokens_total": stats.num_blocks * stats.block_size,
        "resident": resident_tokens > 0, "resident_tokens": resident_tokens,
    }


class ErrorCounter:
    """Pure ASGI middleware counting responses with status >= 400 (unlike an @app.middleware
    function, it leaves `receive` alone, so client disconnects still reach the handlers)."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.error(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
