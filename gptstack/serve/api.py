"""The OpenAI API's requests and answers: what a request may say (checked, with OpenAI's error shape when it is
wrong), a running request as the event loop sees it (`Run`), and the text, chunks and log-probabilities sent back."""
from __future__ import annotations

import asyncio
import secrets
import time
from itertools import accumulate
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..generate import Generation, Sequence, row_seed

MAX_BODY = 1 << 20  # bytes in a request body
MAX_MESSAGES = 256
MAX_STOPS = 4


class APIError(Exception):
    """A request the server refuses, as OpenAI says so: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}},
                            self.status)


# ---------------------------------------------------------------- requests

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not silently ignored


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]
    name: str | None = None

    def chat_message(self, index: int, image_size: int) -> dict:
        """The message as the chat template takes it: its text, or its parts with each picture decoded from its
        data: URL and scaled to the model's `image_size` (0: the model takes no images, so a picture is a 400)."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        parts = []
        for j, p in enumerate(self.content):
            if p.type == "text":
                parts.append({"type": "text", "text": p.text})
                continue
            param = f"messages.{index}.content.{j}.image_url"
            if not image_size:
                raise APIError(400, "This model takes no images.", param, "image_not_supported")
            parts.append({"type": "image", "image": data_url_image(p.image_url.url, image_size, param)})
        return {"role": self.role, "content": parts}


def data_url_image(url: str, image_size: int, param: str):
    """A `data:image/...;base64,...` URL's picture as the model's (3, S, S) tensor. Nothing is fetched: any
    other URL, or bytes that are no picture, is a 400."""
    import base64
    import binascii

    from ..errors import GptstackError
    from ..images import read_image
    head, comma, body = url.partition(",")
    if not (url.startswith("data:image/") and head.endswith(";base64") and comma):
        raise APIError(400, "Only base64 data: URLs (data:image/png;base64,...) are accepted for images; this server "
                            "fetches nothing.", param, "invalid_image_url")
    try:
        raw = base64.b64decode(body, validate=True)
        return read_image(raw, image_size, "the image")
    except (binascii.Error, GptstackError) as e:
        raise APIError(400, f"The image could not be read: {e}", param, "invalid_image") from None


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop sequences, none of them empty")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(Sampling):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=5)


def validation_error(errors: list[dict]) -> APIError:
    """The first of pydantic's complaints as one 400 that names the parameter."""
    err = errors[0]
    loc = ".".join(str(x) for x in err["loc"] if x != "body")
    if err["type"] == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request.", None, "invalid_json")
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {loc}", loc, "unknown_parameter")
    return APIError(400, f"{loc}: {err['msg']}" if loc else err["msg"], loc or None, err["type"])


# ---------------------------------------------------------------- a running request

class TextStream:
    """A sequence's text as its tokens arrive: what may be sent now. Never a stop string (the text ends before it),
    nor the start of one that the next token might complete, nor half of a multi-byte character."""

    def __init__(self, tok, stops: tuple[str, ...]):
        self.tok, self.stops = tok, stops
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was seen; later tokens add nothing

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tok.decode(self.tokens, skip_special=True)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._send(text[:cut])
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - hold]
        return self._send(text.rstrip("\ufffd"))  # the rest of a character is still to come

    def close(self) -> str:
        """What was held back, once the sequence has ended without a stop string."""
        return "" if self.stopped else self._send(self.tok.decode(self.tokens, skip_special=True))

    def _send(self, text: str) -> str:
        delta = text[len(self.sent):] if len(text) > len(self.sent) else ""
        self.sent = self.sent + delta
        return delta


class Run:
    """One request's sequences in the engine, seen from the event loop: `events()` yields (choice, token) in the
    order the engine sampled them, then (choice, None) when that choice has ended."""

    def __init__(self, worker, prompt: list[int], req: Sampling, max_tokens: int, stop_ids: tuple[int, ...],
                 top_logprobs: int, tok, images=None):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.id, self.created, self.prompt = secrets.token_hex(12), int(time.time()), prompt
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        self.seqs = [Sequence(prompt, max_tokens, req.temperature, 0, req.top_p, row_seed(seed, i), stop_ids, req.stops(),
                              top_logprobs, images=images) for i in range(req.n)]
        for i, s in enumerate(self.seqs):
            s.on_token = lambda token, i=i: self._post((i, token))
        self.texts = [TextStream(tok, req.stops()) for _ in self.seqs]
        self.counts = [0] * req.n  # tokens seen so far of each choice
        worker.submit(self.seqs, lambda s, error: self._post((self.seqs.index(s), error or None)))

    def _post(self, item) -> None:  # from the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    async def events(self, request=None):
        """With `request` (a plain response): give up when its client has gone (looked at twice a second)."""
        left, looked = len(self.seqs), self.loop.time()
        while left:
            if request is not None and self.loop.time() - looked > 0.5:
                looked = self.loop.time()
                if await request.is_disconnected():
                    self.cancel()
                    return
            try:
                i, item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            if isinstance(item, BaseException):
                raise APIError(500, f"the engine failed: {item}", kind="server_error")
            if item is None:
                left -= 1
            else:
                self.counts[i] += 1
            yield i, item

    def cancel(self) -> None:
        """Free the slots: each sequence leaves the batch at the engine's next step (or the queue, if waiting)."""
        for s in self.seqs:
            s.cancelled = True

    def finish_reason(self, i: int) -> str:
        return "stop" if self.seqs[i].out.finished else "length"

    def usage(self) -> dict:
        completion = sum(len(s.out.tokens) for s in self.seqs)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}


# ---------------------------------------------------------------- log-probabilities

def shown_tokens(g: Generation, count: int, stop_ids: tuple[int, ...]) -> int:
    """How many of the first `count` tokens are the answer's (not the stop token that closed it)."""
    return count - 1 if count and g.finished and count == len(g.tokens) and g.tokens[count - 1] in stop_ids else count


def chat_logprobs(tok, g: Generation, start: int, end: int) -> dict:
    def entry(token, logprob):
        piece = tok.decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}
    return {"content": [{**entry(g.tokens[j], g.logprobs[j]),
                         "top_logprobs": [entry(t, lp) for t, lp in g.top_logprobs[j]] if g.top_logprobs else []}
                        for j in range(start, end)]}


def completion_logprobs(tok, g: Generation, start: int, end: int) -> dict:
    """The legacy completions form; `text_offset`: where each token's text starts in the answer."""
    pieces = [tok.decode([t]) for t in g.tokens[:end]]
    offsets = list(accumulate(map(len, pieces[:end - 1]), initial=0))[start:end]  # one pass, not a sum per token
    pieces = pieces[start:]
    top = [{tok.decode([t]): lp for t, lp in g.top_logprobs[j]} for j in range(start, end)] if g.top_logprobs else None
    return {"tokens": pieces, "token_logprobs": g.logprobs[start:end], "top_logprobs": top, "text_offset": offsets}
