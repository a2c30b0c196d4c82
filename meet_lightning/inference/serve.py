"""``python -m meet_lightning serve --model DIR``: an OpenAI-compatible HTTP endpoint that chooses controls per request.

Any OpenAI client talks to it (``base_url="http://127.0.0.1:8000/v1"``). A request picks its controls in one of
three ways, the first present wins:

1. ``"controls": ["concise"]`` in the request body (the ``openai`` client: ``extra_body={"controls": [...]}``);
2. ``"chat_template_kwargs": {"controls": [...]}`` — vLLM's spelling, so one client works against both;
3. a first system message ``controls: concise, harmless/good`` (``controls: none`` for none) — the directive the
   exported chat template also reads (:func:`~meet_lightning.controls.vocab.split_directive`), so the same
   request steers llama.cpp's server on a GGUF of the export.

Endpoints: ``GET /v1/models`` (each model lists its ``controls``), ``POST /v1/chat/completions`` (``stream`` as
server-sent events). One request generates at a time (one model, one CPU or GPU); others wait. Parameters the
server does not implement (``n`` > 1, ``stop``, ``tools``, penalties, ``logprobs``) are refused with a 400 naming
them, never ignored. Temperature and ``max_tokens`` default to the command's decoding flags (greedy unless
``--temperature`` is given), not to OpenAI's 1.0. No ``usage`` is reported: the prompt's learned control slots
are not tokens of the text, so a token count would mislead.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from meet_lightning.controls.vocab import split_directive
from meet_lightning.data.tokenization import PromptTokenizer
from meet_lightning.errors import ConfigError
from meet_lightning.inference.chat import TokenPrinter
from meet_lightning.inference.export import AlignedModel
from meet_lightning.inference.generation import DecodingOptions, resolve_controls

ROLES = ("system", "user", "assistant")
UNSUPPORTED = {
    "n": lambda v: v not in (None, 1),
    "stop": lambda v: v not in (None, [], ""),
    "tools": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none"),
    "logprobs": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "logit_bias": lambda v: bool(v),
}
"""Request fields this server does not implement, and when a value asks for them."""


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and OpenAI's error body, naming the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class ChatRequest:
    """One ``/v1/chat/completions`` request, checked."""

    messages: list[dict[str, str]]
    controls: list[str]
    decoding: DecodingOptions
    stream: bool


def text_content(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of ``{"type": "text", "text": …}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"{where}.content must be a string or a list of text parts", where)


def parse_messages(raw: Any) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with roles system, user or assistant, ending with a user turn."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list", "messages")
    messages = []
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        messages.append({"role": role, "content": text_content(message.get("content"), f"messages[{i}]")})
    return messages


def request_controls(body: Mapping[str, Any], directive: list[str] | None) -> list[str]:
    """The controls a request chose: its ``controls``, else ``chat_template_kwargs.controls``, else the directive."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise RequestError("chat_template_kwargs must be an object", "chat_template_kwargs")
    for where, value in (("controls", body.get("controls")), ("chat_template_kwargs.controls", kwargs.get("controls"))):
        if value is not None:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RequestError(f"{where} must be a list of control names", where)
            return value
    return directive or []


def parse_request(body: Any, defaults: DecodingOptions) -> ChatRequest:
    """A checked :class:`ChatRequest`, or :class:`RequestError` naming the first bad field."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    asked = [name for name, asks in UNSUPPORTED.items() if asks(body.get(name))]
    if asked:
        raise RequestError(f"not supported by this server: {', '.join(asked)} — leave them out", asked[0])
    messages, directive = split_directive(parse_messages(body.get("messages")))
    if not messages:
        raise RequestError("messages holds only the controls directive — add the user's message", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    temperature, top_p = body.get("temperature"), body.get("top_p")
    decoding = dataclasses.replace(
        defaults,
        max_new_tokens=defaults.max_new_tokens if max_tokens is None else max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        seed=body.get("seed", defaults.seed),
        batch_size=1,
    )
    wrong = [f for f in ("max_new_tokens", "temperature", "top_p") if not isinstance(getattr(decoding, f), int | float)]
    problems = [f"{f} must be a number" for f in wrong] or decoding.problems(flag="")
    if problems:
        raise RequestError("; ".join(problems).replace("max_new_tokens", "max_tokens"))
    return ChatRequest(messages, request_controls(body, directive), decoding, bool(body.get("stream", False)))


class ControlServer:
    """The model behind the endpoint: answers one request at a time.

    Args:
        model: The model (an export with controls, or a plain one).
        name: The model id clients see and send.
        decoding: Defaults for what a request leaves out.
    """

    def __init__(self, model: AlignedModel, name: str, decoding: DecodingOptions) -> None:
        self.model, self.name, self.decoding = model, name, decoding
        self.lock = threading.Lock()
        encoder = PromptTokenizer(model.tokenizer, 1)
        self.stop_ids = {encoder.eot_id, model.tokenizer.eos_token_id} - {None}

    def models(self) -> dict[str, Any]:
        """The ``/v1/models`` body."""
        entry = {"id": self.name, "object": "model", "created": 0, "owned_by": "meet_lightning"}
        return {"object": "list", "data": [{**entry, "controls": self.model.controls}]}

    def check(self, request: ChatRequest) -> None:
        """Refuses controls the model does not know (before a stream's first byte: a 400, not a broken stream)."""
        if request.controls and not self.model.controls:
            raise RequestError("this model has no controls (a plain model) — leave controls out", "controls")
        try:
            resolve_controls(self.model.schema, request.controls)
        except ConfigError as error:
            raise RequestError(str(error), "controls") from None

    def complete(self, request: ChatRequest, write: Callable[[str], None]) -> str:
        """Generates the answer, passing each new piece of text to ``write``; returns the finish reason."""
        self.check(request)
        printer = TokenPrinter(self.model.tokenizer, write, end="")
        with self.lock:
            if request.decoding.seed is not None:
                torch.manual_seed(request.decoding.seed)
            self.model.generate([request.messages], control=request.controls or None, streamer=printer, options=request.decoding)
        return "stop" if printer.ids and printer.ids[-1] in self.stop_ids else "length"


def completion(server: ControlServer, text: str, finish: str) -> dict[str, Any]:
    """A ``chat.completion`` body."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": server.name, "choices": [choice]}  # fmt: skip


def chunk(identity: str, server: ControlServer, delta: dict[str, str], finish: str | None = None) -> bytes:
    """One server-sent event of a streamed ``chat.completion.chunk``."""
    body = {"id": identity, "object": "chat.completion.chunk", "created": int(time.time()), "model": server.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


class Handler(BaseHTTPRequestHandler):
    """HTTP for :class:`ControlServer` (set as the class attribute ``server_model``)."""

    server_model: ControlServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 — the base class's name
        """Quiet: requests are not logged line by line."""

    def send_json(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_body(self, status: int, message: str, param: str | None = None) -> None:
        error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
        self.send_json(status, {"error": error})

    def do_GET(self) -> None:  # noqa: N802 — http.server's name
        if self.path.rstrip("/") == "/v1/models":
            self.send_json(200, self.server_model.models())
        else:
            self.send_error_body(404, f"no route {self.path} — use /v1/models or /v1/chat/completions")

    def do_POST(self) -> None:  # noqa: N802 — http.server's name
        if self.path.rstrip("/") != "/v1/chat/completions":
            self.send_error_body(404, f"no route {self.path} — use /v1/chat/completions")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            request = parse_request(body, self.server_model.decoding)
            if request.stream:
                self.stream(request)
            else:
                pieces: list[str] = []
                finish = self.server_model.complete(request, pieces.append)
                self.send_json(200, completion(self.server_model, "".join(pieces), finish))
        except json.JSONDecodeError as error:
            self.send_error_body(400, f"the request body is not JSON: {error}")
        except RequestError as error:
            self.send_error_body(400, str(error), error.param)

    def stream(self, request: ChatRequest) -> None:
        """Sends the answer as server-sent events, a chunk per new piece of text, then ``data: [DONE]``."""
        model = self.server_model
        model.check(request)
        identity = f"chatcmpl-{uuid.uuid4().hex}"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(chunk(identity, model, {"role": "assistant", "content": ""}))

        def write(text: str) -> None:
            self.wfile.write(chunk(identity, model, {"content": text}))
            self.wfile.flush()

        finish = model.complete(request, write)
        self.wfile.write(chunk(identity, model, {}, finish) + b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(model: ControlServer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for ``model`` bound to ``host:port`` (port 0: any free port; read ``server_address``)."""
    handler = type("BoundHandler", (Handler,), {"server_model": model})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
