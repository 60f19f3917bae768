"""OpenAI-compatible HTTP API over an :class:`~moesd_jax.serving.engine.Engine`.

Endpoints (``create_app(engine, tokenizer, model_name)``):

* ``POST /v1/completions``: ``prompt`` (string, list of token ids, or a one-element list
  of either), ``max_tokens`` (default 16), ``temperature`` (default 1.0; 0 = greedy),
  ``top_p``, ``top_k`` (extension; 0 or -1 = off), ``seed``, ``stop`` (string or list of
  strings, matched on the text; the matched stop string is not returned), ``stream`` (SSE
  in OpenAI's format ending with ``data: [DONE]``; ``stream_options.include_usage``),
  ``n`` = 1 only. Extensions (vLLM's names): ``stop_token_ids``, ``return_token_ids``
  (adds ``prompt_token_ids`` / ``token_ids`` to the choice). ``logprobs``, ``echo``,
  ``best_of > 1``, penalties and ``logit_bias`` answer 400 "... not supported".
* ``POST /v1/chat/completions``: the same over the tokenizer's chat template; 400 with a
  clear message when the tokenizer has none.
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus, see
  :mod:`moesd_jax.serving.metrics`).

Every response's ``usage`` has prompt/completion/total tokens and ``spec_decode``:
drafts, draft_tokens, accepted_tokens, accepted_tokens_per_position,
mean_acceptance_length. ``completion_tokens`` counts every token the engine generated
for the request (also those past a stop string in the last step), which is what the
``moesd:generation_tokens_total`` counter sums.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: invalid
fields 400 naming the field; prompt + max_tokens beyond the cache 400 naming
``max_len``; full queue 429; shutting down 503; bad JSON / non-UTF-8 body 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from moesd_jax.serving.engine import (
    Engine,
    EngineClosedError,
    QueueFullError,
    RequestError,
    RequestHandle,
    SamplingParams,
    StreamEvent,
)
from moesd_jax.serving.metrics import make_registry

MAX_STOP_STRINGS = 8
# Idle keep-alive connections stay open this long (uvicorn's default is 5 s, the same as
# httpx's client-side expiry: a client reusing a connection just as the server closes it
# gets "Server disconnected without sending a response"). Longer than clients' expiry.
KEEP_ALIVE_S = 65

# ---------------------------------------------------------------------------------------
# request schemas


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**31)] | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    stop_token_ids: list[StrictInt] | None = None
    return_token_ids: StrictBool = False


class CompletionRequest(_Common):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


# ---------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or {400: "invalid_request_error", 404: "not_found_error",
                              429: "rate_limit_error", 503: "service_unavailable"}.get(
                                  status, "server_error")


def _error_response(status: int, message: str, param: str | None = None,
                    type_: str | None = None) -> JSONResponse:
    e = APIError(status, message, param, type_)
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param,
                                   "code": status}}, status_code=status)


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    """One line naming each bad field, e.g. ``max_tokens: Input should be ... >= 1``."""
    parts, seen = [], []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        field = loc[0] if loc else "body"
        if field in seen:
            continue
        seen.append(field)
        many = sum(1 for x in err.errors() if x["loc"] and str(x["loc"][0]) == field) > 1
        if e["type"] == "missing":
            parts.append(f"{field}: field required")
        elif many and field == "prompt":
            parts.append("prompt: must be a string, a list of token ids (integers), or a "
                         "list holding one of those")
        elif many:
            parts.append(f"{field}: invalid value {e.get('input')!r} ({e['msg']})")
        else:
            where = ".".join(loc)
            parts.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return "invalid request: " + "; ".join(parts), (seen[0] if seen else None)


async def _parse(request: Request, model: type[BaseModel]):
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 ({e.reason} at byte "
                       f"{e.start})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} (line {e.lineno}, "
                       f"column {e.colno})") from e
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise APIError(400, msg, param) from e


# ---------------------------------------------------------------------------------------
# incremental detokenisation with stop strings


class _Detok:
    """Turns a growing token list into text deltas; cuts at the first stop string.

    Text that could still become a stop string (a suffix equal to a stop string's
    prefix) or an incomplete UTF-8 character (trailing U+FFFD) is held back until the
    next tokens decide it.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def _decode(self) -> str:
        if self.tok is None:
            return ""
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        if self.stopped or not ids:
            return ""
        self.ids.extend(ids)
        text = self._decode()
        if self.stops:
            start = max(0, self.sent - max(len(s) for s in self.stops))
            hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
            if hits:
                cut = max(min(hits), self.sent)
                delta = text[self.sent:cut]
                self.text, self.sent, self.stopped = text[:cut], cut, True
                return delta
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, end - self.sent), hold, -1):
                if text.endswith(s[:n], 0, end):
                    hold = n
                    break
        end -= hold
        delta = text[self.sent:end]
        self.sent = max(self.sent, end)
        self.text = text
        return delta

    def flush(self) -> str:
        """The held-back rest once generation has ended (no stop string matched)."""
        if self.stopped:
            return ""
        text = self._decode()
        delta = text[self.sent:]
        self.sent, self.text = len(text), text
        return delta


# ---------------------------------------------------------------------------------------
# the app


def _usage(n_prompt: int, ev: StreamEvent) -> dict:
    st = ev.stats or {}
    n_out = len(ev.all_token_ids or [])
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        "spec_decode": {
            "drafts": st.get("drafts", 0),
            "draft_tokens": st.get("draft_tokens", 0),
            "accepted_tokens": st.get("accepted_tokens", 0),
            "accepted_tokens_per_position": st.get("accepted_per_position", []),
            "mean_acceptance_length": st.get("mean_acceptance_length", 1.0),
        },
    }


class _Server:
    """Request handling shared by both endpoints."""

    def __init__(self, engine: Engine, tokenizer, model_name: str):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.created = int(time.time())

    # ------------------------------------------------------------------ preparation
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", "model")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this server has no tokenizer: send the prompt as a list of "
                           "token ids", "prompt")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: {len(prompt)} prompts given; this server takes "
                               "one prompt per request", "prompt")
            prompt = prompt[0]
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "prompt: is empty", "prompt")
        return ids

    def params(self, req: _Common, max_tokens: int | None) -> tuple[SamplingParams, list[str]]:
        if req.n != 1:
            raise APIError(400, f"n={req.n}: only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported", name)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: {len(stops)} stop strings given, at most "
                           f"{MAX_STOP_STRINGS} are supported", "stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop: stop strings must not be empty", "stop")
        stop_ids = None
        if req.stop_token_ids:
            stop_ids = tuple(self.engine.eos_token_ids) + tuple(req.stop_token_ids)
        top_k = req.top_k or 0
        params = SamplingParams(
            max_tokens=16 if max_tokens is None else max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=0 if top_k < 0 else top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=secrets.randbelow(2**31) if req.seed is None else req.seed,
            stop_token_ids=stop_ids,
        )
        return params, stops

    def submit(self, ids: list[int], params: SamplingParams) -> RequestHandle:
        try:
            return self.engine.submit(ids, params)
        except RequestError as e:
            msg = str(e)
            param = "max_tokens" if "max_len" in msg else (
                "stop_token_ids" if "stop" in msg else "prompt")
            raise APIError(400, msg, param) from e
        except QueueFullError as e:
            raise APIError(429, str(e)) from e
        except EngineClosedError as e:
            raise APIError(503, str(e)) from e

    # ------------------------------------------------------------------ generation
    async def events(self, handle: RequestHandle, detok: _Detok) -> AsyncIterator[tuple]:
        """Yields ("delta", text) and finally ("final", event, reason)."""
        try:
            async for ev in handle:
                if ev.token_ids and not detok.stopped:
                    delta = detok.add(ev.token_ids)
                    if detok.stopped:
                        handle.cancel("stop")
                    if delta:
                        yield ("delta", delta)
                if ev.finished:
                    if ev.error:
                        raise APIError(500, ev.error, type_="server_error")
                    reason = "stop" if detok.stopped else ev.finish_reason
                    rest = detok.flush()
                    if rest:
                        yield ("delta", rest)
                    yield ("final", ev, reason)
                    return
        finally:
            handle.cancel("abort")  # no-op when finished; frees the slot otherwise

    async def collect(self, request: Request, handle: RequestHandle, detok: _Detok):
        """Runs to the end (non-streaming); cancels the request if the client leaves."""

        async def run():
            parts = []
            async for item in self.events(handle, detok):
                if item[0] == "delta":
                    parts.append(item[1])
                else:
                    return "".join(parts), item[1], item[2]

        async def disconnected():
            # the body has been read: the next ASGI message is http.disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(run())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            handle.cancel("abort")
            raise APIError(499, "client disconnected")
        finally:
            for t in (task, watch):
                if not t.done():
                    t.cancel()


def create_app(engine: Engine, tokenizer, model_name: str) -> FastAPI:
    """The FastAPI app serving ``engine`` (started by the caller) as ``model_name``.

    Args:
      engine: a started :class:`Engine`.
      tokenizer: a Hugging Face tokenizer (text prompts, output text, chat template), or
        None (token-id prompts only; output in ``token_ids``).
      model_name: the ``model`` id clients use.
    """
    app = FastAPI(title="moesd_jax", docs_url=None, redoc_url=None, openapi_url=None)
    srv = _Server(engine, tokenizer, model_name)
    registry = make_registry(engine, model_name)
    app.state.server = srv
    app.state.registry = registry

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e.status, e.message, e.param, e.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error_response(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        if not (engine.healthy and alive):
            return JSONResponse({"status": "unhealthy", "error": engine.last_error},
                                status_code=503)
        if not engine.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": srv.created,
            "owned_by": "moesd_jax", "max_model_len": engine.max_len,
            "spec_decode": {"method": engine.spec.method, "k": engine.cfg.k_eff,
                            "tree": getattr(engine.spec, "tree", None)},
        }]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        srv.check_model(req.model)
        if req.logprobs is not None:
            raise APIError(400, "logprobs is not supported", "logprobs")
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        if req.best_of not in (None, 1):
            raise APIError(400, f"best_of={req.best_of}: only 1 is supported", "best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        ids = srv.prompt_ids(req.prompt)
        params, stops = srv.params(req, req.max_tokens)
        return await _respond(request, srv, req, ids, params, stops, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        srv.check_model(req.model)
        tok = srv.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, f"the model {model_name!r} has no chat template in its "
                           "tokenizer, so /v1/chat/completions is unavailable; use "
                           "/v1/completions with a text prompt", "messages")
        if req.logprobs:
            raise APIError(400, "logprobs is not supported", "logprobs")
        msgs = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text for p in content)
            msgs.append({"role": m.role, "content": content or ""})
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja errors of the template
            raise APIError(400, f"messages: the chat template failed: {e}", "messages") from e
        ids = srv.encode(text)
        max_tokens = req.max_completion_tokens or req.max_tokens
        params, stops = srv.params(req, max_tokens)
        return await _respond(request, srv, req, ids, params, stops, chat=True)

    return app


async def _respond(request: Request, srv: _Server, req: _Common, ids: list[int],
                   params: SamplingParams, stops: list[str], chat: bool):
    handle = srv.submit(ids, params)
    detok = _Detok(srv.tokenizer, stops)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    model = srv.model_name

    def choice_final(text, reason, ev):
        c: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        if req.return_token_ids:
            c["prompt_token_ids"] = ids
            c["token_ids"] = list(ev.all_token_ids or [])
        return c

    if not req.stream:
        text, ev, reason = await srv.collect(request, handle, detok)
        return {"id": rid, "object": obj, "created": created, "model": model,
                "choices": [choice_final(text, reason, ev)], "usage": _usage(len(ids), ev)}

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices, usage=None):
        d = {"id": rid, "object": chunk_obj, "created": created, "model": model,
             "choices": choices}
        if usage is not None:
            d["usage"] = usage
        return "data: " + json.dumps(d) + "\n\n"

    def delta_choice(text, reason=None, ev=None):
        c: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            c["delta"] = {"content": text} if text else {}
        else:
            c["text"] = text
        if reason is not None and req.return_token_ids and ev is not None:
            c["token_ids"] = list(ev.all_token_ids or [])
        return c

    async def sse():
        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            async for item in srv.events(handle, detok):
                if item[0] == "delta":
                    yield chunk([delta_choice(item[1])])
                else:
                    _, ev, reason = item
                    yield chunk([delta_choice("", reason, ev)])
                    if include_usage:
                        yield chunk([], _usage(len(ids), ev))
            yield "data: [DONE]\n\n"
        except APIError as e:
            yield "data: " + json.dumps({"error": {"message": e.message, "type": e.type,
                                                   "code": e.status}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel("abort")

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------
# running the server


def _bind(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}/v1"


class ServerThread:
    """uvicorn serving ``app`` in a background thread (tests, notebooks).

    ``port=0`` picks a free port; ``url`` is the ``.../v1`` base URL once started.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import uvicorn

        self.sock = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = _url(host, self.port)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off",
                                                    timeout_graceful_shutdown=5,
                                                    timeout_keep_alive=KEEP_ALIVE_S))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="moesd-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self.sock.close()


def serve(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1",
          port: int = 8000, *, log_level: str = "info", drain_timeout: float | None = None,
          on_ready=None) -> bool:
    """Serves until SIGINT/SIGTERM, then drains: new requests are refused (503, and the
    listening socket closes), requests in flight finish, the engine stops.

    Args:
      engine: a started engine.
      on_ready: called with the base URL (``http://host:port/v1``) once listening.
      drain_timeout: seconds to wait for in-flight requests at shutdown (None = forever).

    Returns:
      True if every in-flight request finished normally.
    """
    import uvicorn

    app = create_app(engine, tokenizer, model_name)
    sock = _bind(host, port)
    url = _url(host, sock.getsockname()[1])

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop_accepting()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its shutdown, which would kill the
            # process before the engine has drained: we exit normally instead
            self._captured_signals.clear()

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if on_ready is not None and self.started:
                on_ready(url)

    server = _Uvicorn(uvicorn.Config(app, log_level=log_level, lifespan="off",
                                     timeout_graceful_shutdown=drain_timeout,
                                     timeout_keep_alive=KEEP_ALIVE_S))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop_accepting()
        drained = engine.shutdown(drain=True, timeout=drain_timeout)
        with contextlib.suppress(OSError):
            sock.close()
    return drained
