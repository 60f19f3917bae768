"""OpenAI-compatible serving: continuous-batching engine + FastAPI app.

Quick start::

    from moesd_jax.serving import Engine, SamplingParams, create_app, serve
    engine = Engine(target, draft, SpecConfig(method="draft", k=4), slots=8).start()
    serve(engine, tokenizer, "my-model", port=8000)   # or create_app(...) for ASGI
"""

from moesd_jax.serving.engine import (
    Engine,
    EngineClosedError,
    EnginePolicy,
    QueueFullError,
    RequestError,
    RequestHandle,
    SamplingParams,
    StepPlan,
    StreamEvent,
    enable_compilation_cache,
    load_engine,
)


def __getattr__(name):  # the HTTP layer imports fastapi/uvicorn lazily
    if name in ("create_app", "serve", "ServerThread"):
        from moesd_jax.serving import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = [
    "Engine", "EngineClosedError", "EnginePolicy", "QueueFullError", "RequestError",
    "RequestHandle", "SamplingParams", "StepPlan", "StreamEvent", "enable_compilation_cache",
    "load_engine", "create_app", "serve", "ServerThread",
]
