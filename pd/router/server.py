"""pd-router's OpenAI front door: route each request, forward it, stream the answer through."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.kv_cache.prefix_hash import chain_hashes
from engine.tokenizer import Tokenizer
from pd.decode.serving_chat import PREFILL_NODE_HEADER
from pd.decode.sessions import SessionStore, cache_salt
from pd.openai.errors import OpenAIError, bad_request, install_error_handlers, overloaded
from pd.router.metrics import RouterMetrics
from pd.router.policy import Policy, RouteRequest
from pd.router.registry import Registry

logger = logging.getLogger("pd.router")
_ROUTED = ("/v1/chat/completions", "/v1/completions")
_FORWARDED_GET = ("/v1/models",)


@dataclass
class RouterState:
    registry: Registry
    policy: Policy
    tokenizer: Tokenizer
    metrics: RouterMetrics
    client: httpx.AsyncClient
    api_keys: frozenset[str] = frozenset()
    max_retries: int = 2
    retry_backoff_s: float = 0.2


def create_router_app(state: RouterState) -> FastAPI:
    app = FastAPI(title="pdserve router", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await route_and_forward(state, request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await route_and_forward(state, request, "/v1/completions")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await route_and_forward(state, request, "/v1/embeddings", routed=False)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await route_and_forward(state, request, "/tokenize", routed=False)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await route_and_forward(state, request, "/detokenize", routed=False)

    @app.get("/v1/models")
    async def models(request: Request):
        return await forward_get(state, request, "/v1/models")

    @app.get("/v1/usage")
    async def usage(request: Request):
        session_id = request.query_params.get("session_id", "")
        key = SessionStore.engine_key(_api_key(request), session_id)
        node = state.registry.index.session_node(key)
        return await forward_get(state, request, "/v1/usage", prefer=node)

    @app.get("/health")
    async def health():
        decodes = state.registry.usable("decode")
        ok = bool(decodes)
        return JSONResponse({"status": "ok" if ok else "unavailable", "role": "router",
                             "decode_nodes": len(decodes), "prefill_nodes": len(state.registry.usable("prefill"))},
                            status_code=200 if ok else 503)

    @app.get("/router/nodes")
    async def nodes():
        return {"nodes": [{"node_id": w.view.node_id, "role": w.view.role, "address": w.view.address,
                           "healthy": w.view.healthy, "registered": w.registered, "load": w.view.load,
                           "num_running": w.view.num_running, "num_waiting": w.view.num_waiting,
                           "cached_blocks": len(state.registry.index.node_blocks(w.view.node_id))}
                          for w in state.registry.workers.values()]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _api_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _route_request(state: RouterState, body: dict, path: str, api_key: str | None) -> RouteRequest:
    """Token ids -> block hashes, as the decode node will see them (for cache-aware routing)."""
    try:
        if path == "/v1/chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
            ids = state.tokenizer.encode_chat([_plain(m) for m in messages])
        else:
            prompt = body.get("prompt")
            ids = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else \
                state.tokenizer.encode(prompt if isinstance(prompt, str) else str(prompt))
    except Exception:  # the decode node validates and answers properly; route by load only
        ids = []
    bs = state.registry.block_size
    session_id = body.get("session_id")
    key = SessionStore.engine_key(api_key, session_id) if isinstance(session_id, str) and session_id else None
    return RouteRequest(chain_hashes(ids, bs, cache_salt(api_key)), len(ids), bs, key)


def _plain(message) -> dict:
    if not isinstance(message, dict):
        raise ValueError("bad message")
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {"role": message.get("role"), "content": content or ""}


async def route_and_forward(state: RouterState, request: Request, path: str, routed: bool = True):
    if state.api_keys and _api_key(request) not in state.api_keys:
        raise OpenAIError(401, "missing or invalid API key")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        raise bad_request("could not parse the request body as JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    # nodes salt caches and name sessions by API key only when keys are configured (the
    # router's --api-key list is taken to be the nodes' too)
    key = _api_key(request) if state.api_keys else None
    route = _route_request(state, body, path, key) if routed else None
    tried: set[str] = set()
    last_error = "no healthy decode node"
    for attempt in range(state.max_retries + 1):
        decodes = state.registry.usable("decode", tried)
        if not decodes:
            break
        prefills = state.registry.usable("prefill")
        t0 = time.perf_counter()
        if route is not None:
            decision = state.policy.choose(route, decodes, prefills, state.registry.index)
            state.metrics.decision(state.policy.name, decision, route, time.perf_counter() - t0)
            logger.debug("route: decode %s, prefill %s, %s, cached %d/%d tokens, scores %s",
                         decision.decode.node_id, decision.prefill.address if decision.prefill else "local",
                         decision.reason, decision.cached_tokens, route.num_tokens, decision.scores)
            decode, prefill = decision.decode, decision.prefill
        else:
            decode, prefill = min(decodes, key=lambda n: n.load), None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        headers[PREFILL_NODE_HEADER] = prefill.address if prefill is not None else "none"
        decode.inflight += 1  # counted before sending, so a burst spreads over the nodes
        try:
            upstream = await state.client.send(
                state.client.build_request("POST", decode.address + path, content=raw, headers=headers),
                stream=True)
        except httpx.HTTPError as exc:
            decode.inflight -= 1
            last_error = f"{decode.node_id}: {type(exc).__name__}"
            state.registry.mark_down(decode.node_id, f"request failed: {exc!r}")
        else:
            if upstream.status_code < 500 and upstream.status_code != 429:
                if route is not None and route.session_key and upstream.status_code < 400:
                    state.registry.index.session_resident(decode.node_id, route.session_key)
                return _passthrough(state, upstream, decode)
            decode.inflight -= 1
            last_error = f"{decode.node_id} answered {upstream.status_code}"
            await upstream.aclose()
            if upstream.status_code in (502, 504) or (upstream.status_code == 503 and not route):
                state.registry.mark_down(decode.node_id, last_error)
        tried.add(decode.node_id)
        state.metrics.retries.inc()
        logger.info("retrying on another decode node (attempt %d): %s", attempt + 1, last_error)
        await asyncio.sleep(state.retry_backoff_s * (2 ** attempt))
    raise overloaded(f"no decode node could serve the request ({last_error})", 503, 1.0)


def _passthrough(state: RouterState, upstream: httpx.Response, node) -> StreamingResponse:
    """Streams the upstream body through unbuffered; the node's in-flight count (taken
    before sending) is released when the body ends."""
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")

    async def body():
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            state.registry.mark_down(node.node_id, f"stream broke: {exc!r}")
            state.metrics.upstream_errors.inc()
            if is_sse:
                err = {"error": {"message": f"the decode node failed mid-stream: {type(exc).__name__}",
                                 "type": "internal_error", "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            node.inflight -= 1
            await upstream.aclose()

    headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
    return StreamingResponse(body(), status_code=upstream.status_code, headers=headers)


async def forward_get(state: RouterState, request: Request, path: str, prefer: str | None = None):
    if state.api_keys and _api_key(request) not in state.api_keys:
        raise OpenAIError(401, "missing or invalid API key")
    decodes = state.registry.usable("decode")
    if prefer:
        decodes.sort(key=lambda n: n.node_id != prefer)
    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
    for node in decodes:
        try:
            r = await state.client.get(node.address + path, params=dict(request.query_params), headers=headers)
        except httpx.HTTPError as exc:
            state.registry.mark_down(node.node_id, f"request failed: {exc!r}")
            continue
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
    raise overloaded("no healthy decode node", 503, 1.0)
