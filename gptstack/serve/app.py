"""`gptstack serve`: the OpenAI API over the one engine, and the web chat page.

    GET  /health               the engine's state: slots, running and waiting sequences, decode steps, cache size
    GET  /v1/models            the one model served
    POST /v1/completions       text in, text out
    POST /v1/chat/completions  messages through the model's chat template; a model with image input also takes
                               `image_url` parts holding base64 data: URLs (nothing is fetched)
    GET  /                     the chat page (gptstack/serve/static: no CDN, works offline)

Requests' sequences join the engine's running batch between decode steps and leave it when they end or their
client goes (worker.py: one thread owns the model). Streaming is server-sent events, `data: {...}` chunks then
`data: [DONE]`. Every refusal is OpenAI's error shape with a 4xx status, never a traceback.
"""
from __future__ import annotations

import json
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..generate import Engine
from ..tokenizer import conversation_images
from .api import (MAX_BODY, APIError, ChatRequest, CompletionRequest, Run, Sampling, chat_logprobs, completion_logprobs,
                  shown_tokens, validation_error)
from .worker import Worker

STATIC = Path(__file__).with_name("static")


class Gate:
    """Before any route: the API key on /v1/ paths (when the server has one) and the cap on a request body's size."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            refusal = None
            if self.api_key and scope["path"].startswith("/v1/") and not secrets.compare_digest(
                    headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode()):
                refusal = APIError(401, "Incorrect API key provided.", None, "invalid_api_key")
            elif scope["method"] == "POST" and b"content-length" not in headers:
                refusal = APIError(411, "A request body needs a Content-Length header.", None, "length_required")
            elif int(headers.get(b"content-length", b"0") or 0) > self.max_body:
                refusal = APIError(413, f"The request body is over {self.max_body} bytes.", None, "request_too_large")
            if refusal is not None:
                return await refusal.response()(scope, receive, send)
        await self.app(scope, receive, send)


class Server:
    """The model, its tokenizer and the engine's worker, behind the routes."""

    def __init__(self, model, tok, model_id: str, max_batch: int):
        self.model, self.tok, self.model_id = model, tok, model_id
        self.n_ctx = model.cfg.n_ctx
        self.worker = Worker(Engine(model, max_batch, tok.pad, lambda ids: tok.decode(ids, skip_special=True)))

    def start(self, req: Sampling, prompt: list[int], max_tokens: int | None, param: str, stop_ids: tuple[int, ...],
              top_logprobs: int = 0, images=None) -> Run:
        if req.model != self.model_id:
            raise APIError(404, f"The model `{req.model}` does not exist; this server has `{self.model_id}`.", "model",
                           "model_not_found")
        if max_tokens is None:  # the rest of the context
            max_tokens = max(self.n_ctx - len(prompt), 1)
        if len(prompt) + max_tokens > self.n_ctx:
            raise APIError(400, f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
                                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {param}, {max_tokens} in the "
                                f"completion). Please reduce the length of the {param} or completion.", param,
                           "context_length_exceeded")
        return Run(self.worker, prompt, req, max_tokens, stop_ids, top_logprobs, self.tok, images)


def sse(chunks) -> StreamingResponse:
    """Server-sent events: each chunk as `data: {...}`, then `data: [DONE]`. An error after the first chunk (the
    status is sent by then) is one last `data: {"error": ...}`."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {e.response().body.decode()}\n\n"
            return
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(model, tok, model_id: str, api_key: str | None = None, max_batch: int = 16) -> FastAPI:
    server = Server(model, tok, model_id, max_batch)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.worker.stop()

    app = FastAPI(title="gptstack", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Gate, api_key=api_key, max_body=MAX_BODY)

    @app.exception_handler(APIError)
    async def refused(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return validation_error(e.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return APIError(e.status_code, str(e.detail), None, {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)).response()

    @app.exception_handler(Exception)
    async def failed(request, e: Exception):
        return APIError(500, "The server had an error while processing your request.", kind="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **server.worker.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "gptstack"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true.", "top_logprobs", "invalid_value")
        vision = model.cfg.vision
        messages = [m.chat_message(i, vision.image_size) for i, m in enumerate(req.messages)]
        prompt = tok.render_chat(messages, for_generation=True, image_tokens=vision.tokens if vision.image_size else 0)[0]
        shown = conversation_images(messages)
        stop_ids = (tok.end, tok.eot)
        run = server.start(req, prompt, req.max_completion_tokens or req.max_tokens, "messages", stop_ids,
                           req.top_logprobs or 0, torch.stack(shown) if shown else None)
        head = {"id": f"chatcmpl-{run.id}", "created": run.created, "model": model_id, "system_fingerprint": None}
        lp = (lambda i, a, b: chat_logprobs(tok, run.seqs[i].out, a, b)) if req.logprobs else None
        if req.stream:
            return sse(stream_chunks(run, req, {**head, "object": "chat.completion.chunk"}, stop_ids, lp, chat=True))
        texts = await whole_texts(run, request)
        return {**head, "object": "chat.completion", "usage": run.usage(), "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": run.finish_reason(i),
             "logprobs": lp(i, 0, shown_tokens(s.out, len(s.out.tokens), stop_ids)) if lp else None}
            for i, (s, text) in enumerate(zip(run.seqs, texts))]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = tok.encode(req.prompt) or [tok.eot]  # no text: the start of a document
        stop_ids = (tok.eot,)
        run = server.start(req, prompt, req.max_tokens, "prompt", stop_ids, req.logprobs or 0)
        head = {"id": f"cmpl-{run.id}", "created": run.created, "model": model_id, "system_fingerprint": None,
                "object": "text_completion"}
        if req.stream:
            lp = (lambda i, a, b: completion_logprobs(tok, run.seqs[i].out, a, b)) if req.logprobs is not None else None
            return sse(stream_chunks(run, req, head, stop_ids, lp, chat=False))
        texts = await whole_texts(run, request)
        return {**head, "usage": run.usage(), "choices": [
            {"index": i, "text": text, "finish_reason": run.finish_reason(i),
             "logprobs": completion_logprobs(tok, s.out, 0, shown_tokens(s.out, len(s.out.tokens), stop_ids))
             if req.logprobs is not None else None}
            for i, (s, text) in enumerate(zip(run.seqs, texts))]}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def whole_texts(run: Run, request: Request) -> list[str]:
    """Every choice's whole text (a plain response); the sequences are dropped if the client goes."""
    try:
        async for i, token in run.events(request):
            if token is not None:
                run.texts[i].push(token)
    finally:
        run.cancel()  # nothing left to free once all have ended; frees the slots if the client went or we failed
    for text in run.texts:
        text.close()
    return [text.sent for text in run.texts]


async def stream_chunks(run: Run, req: Sampling, head: dict, stop_ids: tuple[int, ...], logprobs, chat: bool):
    """The chunks of a streamed answer: each choice's text as it may be sent, its finish reason, then (with
    stream_options.include_usage) one chunk with no choices and the usage. Every chunk carries `usage: null` then."""
    usage = {"usage": None} if req.include_usage() else {}
    sent = [0] * len(run.seqs)  # tokens whose log-probabilities have gone out, per choice

    def chunk(i, text, finish=None):
        g, lp = run.seqs[i].out, None
        if logprobs is not None:
            end = shown_tokens(g, run.counts[i], stop_ids)
            lp, sent[i] = logprobs(i, sent[i], end), end
        body = ({"delta": {"content": text} if text or finish is None else {}} if chat else {"text": text})
        return {**head, **usage, "choices": [{"index": i, **body, "logprobs": lp, "finish_reason": finish}]}
    try:
        if chat:
            for i in range(len(run.seqs)):
                yield {**head, **usage, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]}
        async for i, token in run.events():
            if token is None:
                yield chunk(i, run.texts[i].close(), run.finish_reason(i))
            elif text := run.texts[i].push(token):
                yield chunk(i, text)
        if usage:
            yield {**head, "choices": [], "usage": run.usage()}
    finally:
        run.cancel()  # the client went (the stream was cancelled), or it is all sent


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 16,
          tokenizer: str | None = None) -> None:
    import uvicorn

    from ..checkpoint import find_tokenizer, load_model
    from ..tokenizer import Tokenizer
    model = load_model(model_dir, "auto")
    tok = Tokenizer.load(tokenizer or find_tokenizer(model_dir))
    model_id = str(Path(model_dir))
    app = create_app(model, tok, model_id, api_key, max_batch)
    print(f"gptstack serve: {model_id} on http://{host}:{port}/ (chat page at /, OpenAI API at /v1; "
          f"{max_batch} sequences at a time{'; API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
