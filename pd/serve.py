"""Run a FastAPI app under uvicorn: one 'ready' line once listening, bounded drain on SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

logger = logging.getLogger("pd.serve")


async def serve_app(app, state, host: str, port: int, drain_timeout: float, program: str,
                    log_level: str = "info", on_ready=None, on_stop=None) -> int:
    """Serves until SIGTERM/SIGINT; then stops accepting, lets in-flight requests finish for
    up to drain_timeout seconds, stops the engine, and returns 0."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if log_level == "info" else log_level,
                            timeout_graceful_shutdown=drain_timeout, lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # we own the signals
    loop = asyncio.get_running_loop()

    def begin_drain(signame: str) -> None:
        if not server.should_exit:
            logger.info("%s received: draining in-flight requests (up to %.0f s)", signame, drain_timeout)
            state.draining = True
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, begin_drain, sig.name)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if task.done():
        await task
        return 1
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if on_ready is not None:
        on_ready()
    print(f"{program} ready: http://{shown}:{port}/v1 (model {state.model_name})", flush=True)
    await task
    if on_stop is not None:
        on_stop()
    engine = getattr(state, "engine", None)
    if engine is not None:
        engine.shutdown()
    logger.info("%s stopped", program)
    return 0
