"""The OpenAI-compatible HTTP server of `cke-dist serve`, on rank 0, over a running Engine (request
bodies are checked by protocol.py).

    server = OpenAIServer(("127.0.0.1", 8000), tokenizer, "my-model", chat_template=tpl, api_key=None)
    server.engine = engine            # Engine.build(...) then engine.start()
    server.serve_forever()

Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with
`"stream": true` ending in `data: [DONE]`), GET /v1/models, POST /tokenize and /detokenize (vLLM's),
GET /health, GET /metrics (Prometheus: serving/metrics.py).

Rules it keeps:
- One thread per connection (stdlib ThreadingHTTPServer), HTTP/1.1 keep-alive; every request is
  one Engine request, so concurrent requests are batched by the engine, not by this file.
- A stream is sent with chunked transfer encoding (Connection: close for an HTTP/1.0 client). Its
  200 goes out only with the first token, so an engine that fails before it is still a 503.
- Bad input is a 400 naming the field (OpenAI's error object: message, type, param, code); a body
  is read only after its Content-Length passed the limit (413 over it); unknown fields are
  ignored; features we do not have (suffix, tool_choice "auto") are a 400, never silently dropped.
- tool_choice "required" or a named function: the grammar makes the answer one call, sent as
  message.tool_calls (finish_reason "tool_calls").
- `response_format` json_object / json_schema constrains sampling with a grammar (grammar.py). prompt + max_tokens beyond the context is a 400 naming both numbers.
- Several prompts and n > 1 are one engine request per choice, all submitted before any is read
  (so they decode together); log-probabilities come from the engine with each token.
- A `model` other than the served name is a 404 (model_not_found), as OpenAI and vLLM answer; every
  response carries the server's system_fingerprint.
- With an API key every /v1 path and /tokenize, /detokenize need `Authorization: Bearer <key>`
  (401); /health and /metrics stay open (what load balancers and Prometheus scrape).
- Text: the tokenizer's EOS ids end a request (finish_reason "stop") and are not shown; a stop
  string cuts the text before it (cke_dist.formats.tokenizer.StopText, as the CLI does) and cancels the
  request; usage counts every sampled token.
- A client that goes away (a failed write, or its socket at EOF while we wait) has its request
  cancelled; the engine frees the slot at the next tick.
- A dead engine: every in-flight and new request gets 503 (an `error` event inside a stream
  already started); `serve.py` then ends the process.
Tests: tests/integration/test_serve.py.
"""
from __future__ import annotations

import base64
import hmac
import itertools
import json
import queue
import select
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from cke_dist.formats.tokenizer import StopText, TextStream
from cke_dist.serving.chat import ChatTemplateError
from cke_dist.serving.engine import EngineError, Params
from cke_dist.serving.grammar import GrammarError, Grammars
from cke_dist.serving.metrics import ServerMetrics
from cke_dist.serving.protocol import (COMPLETIONS_DEFAULT_MAX_TOKENS, ApiError, Sampling, chat_messages, checked_text,
                                       is_int, prompt_ids, unavailable)

MAX_BODY = 1 << 20
_GONE_POLL_S = 0.25


class _ClientGone(Exception):
    pass


# ---- one generation, as text ----------------------------------------------------------------------

class Generation:
    """An engine request turned into text pieces: EOS hidden, stop strings cut, the client watched."""

    def __init__(self, server: "OpenAIServer", ids: list[int], s: Sampling, gone, seed=None, prompt_logprobs=False):
        self.server, self.gone = server, gone
        self.prompt_ids = ids
        self.prompt_tokens = len(ids)
        engine = server.engine
        constraint = None
        fmt, field = s.response_format, "response_format"
        if s.tool_schema is not None:     # a forced tool call: the answer is {"name", "arguments"} JSON
            if fmt is not None:
                raise ApiError(400, "send 'response_format' or a forced tool call, not both", "response_format")
            fmt, field = {"type": "json_schema", "json_schema": {"schema": s.tool_schema}}, "tools"
        if fmt is not None:
            try:
                constraint = server.grammars().constraint(fmt)
            except GrammarError as e:
                raise ApiError(400, str(e), field) from None
        try:
            self.req = engine.submit(ids, Params(
                max_tokens=s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=seed,
                stop_ids=() if s.ignore_eos else tuple(server.stop_ids), min_p=s.min_p,
                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                repetition_penalty=s.repetition_penalty, logit_bias=s.logit_bias, logprobs=s.logprobs,
                prompt_logprobs=s.logprobs if prompt_logprobs else None, constraint=constraint))
        except EngineError as e:
            raise unavailable(str(e)) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        self.text = TextStream(server.tokenizer, context=ids)   # a continuation keeps its leading space
        self.cut = StopText(s.stop)
        self.completion_tokens = 0
        self.finish: str | None = None

    def _tokens(self):
        while True:
            try:
                # a fresh generator per wait: one that timed out is finished, the queue is not
                for tok in self.req.stream(timeout=_GONE_POLL_S):
                    yield tok
                return
            except queue.Empty:
                if self.gone():
                    raise _ClientGone() from None
                if not self.server.engine.alive and self.req.finish is None:
                    raise unavailable(self.server.engine.error or "the engine stopped") from None

    def pieces(self):
        """(text piece (maybe ""), [index of the token in req.generated]) per sampled token, then
        (the tail, []); self.finish at the end. The EOS token that ends a request is not shown but
        is scored: lm-eval reads the log-probabilities of an echoed prompt as everything before
        the last entry, the one sampled token."""
        stop_ids = self.server.stop_ids
        try:
            for k, tok in enumerate(self._tokens()):
                self.completion_tokens += 1
                if tok in stop_ids:
                    yield "", [k]
                    continue
                piece = self.cut.push(self.text.push(tok))
                if self.cut.hit:
                    self.req.cancel()
                    self.finish = "stop"
                    yield piece, [k]
                    return
                yield piece, [k]
        except EngineError as e:
            raise unavailable(str(e)) from None
        if self.req.finish not in ("stop", "length"):   # cancelled by engine.shutdown
            raise unavailable("the server is shutting down")
        tail = self.cut.push(self.text.flush())
        if not self.cut.hit:
            tail += self.cut.flush()
        self.finish = "stop" if self.cut.hit else self.req.finish
        yield tail, []

    def scored(self, ks) -> list[tuple[int, float, list]]:
        """(id, logprob, alternatives) of generated tokens ks."""
        return [(self.req.generated[k], *self.req.logprobs[k]) for k in ks]

    def prompt_scored(self) -> list[tuple[int, float | None, list | None]]:
        lps = self.req.prompt_logprobs or [None] * len(self.prompt_ids)
        return [(i, *(lp if lp is not None else (None, None))) for i, lp in zip(self.prompt_ids, lps)]

    def close(self):
        if self.req.finish is None:
            self.req.cancel()


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(v)}", name)
    return v


def _tool_calls(text: str, finish: str | None) -> list[dict] | None:
    """The forced call the grammar shaped, in OpenAI's form; None if it did not finish (length)."""
    if finish != "stop":
        return None
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]


def completion_logprobs(tok, scored, offset: int = 0) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, lp, alts in scored:
        text = tok.decode([i])
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        top = None
        if alts is not None:
            top = {}
            for a, alp in alts:
                top.setdefault(tok.decode([a]), alp)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tok, scored) -> list[dict]:
    """OpenAI's chat logprobs content: token, logprob, bytes, top_logprobs per token."""
    def entry(i, lp):
        text = tok.decode([i])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "surrogatepass"))}
    return [{**entry(i, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]} for i, lp, alts in scored]


# ---- the server ---------------------------------------------------------------------------------

class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True         # a stuck client never holds the process at exit
    request_queue_size = 128

    def __init__(self, address, tokenizer, model_name: str, chat_template=None, api_key: str | None = None,
                 engine=None, max_body: int = MAX_BODY, add_bos: bool = False, access_log: bool = True,
                 fingerprint: str | None = None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template, self.api_key, self.max_body = chat_template, api_key or None, max_body
        self.add_bos, self.access_log = add_bos, access_log
        self.fingerprint = fingerprint
        self.metrics = ServerMetrics(lambda: self.engine)
        self._grammars = None
        self.stop_ids = frozenset(int(i) for i in (getattr(tokenizer, "eos_token_ids", None) or []))
        self.created = int(time.time())
        self._active = 0
        self._idle = threading.Condition()

    def grammars(self) -> Grammars:
        """Structured output's token tables, built at the first request that needs them (~0.6 s)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.engine.vocab)
        return self._grammars

    @property
    def port(self) -> int:
        return self.server_address[1]

    @contextmanager
    def _track(self):
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Until no request is being answered (True) or timeout (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cke-dist"
    timeout = 120      # seconds a socket may stall (an idle keep-alive or a client not reading) before we drop it
    server: OpenAIServer

    # path -> (method, handler name, needs the API key)
    ROUTES = {
        "/v1/completions": ("POST", "_completions", True),
        "/v1/chat/completions": ("POST", "_chat", True),
        "/v1/models": ("GET", "_models", True),
        "/v1/embeddings": ("POST", "_embeddings", True),
        "/tokenize": ("POST", "_tokenize", True),
        "/detokenize": ("POST", "_detokenize", True),
        "/health": ("GET", "_health", False),
        "/metrics": ("GET", "_metrics", False),
    }

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        if self.server.access_log:
            sys.stderr.write(f"cke-dist serve: {self.address_string()} {fmt % args}\n")

    # ---- plumbing

    def _dispatch(self):
        self._body_read = False
        self._headers_sent = False
        self._gen = None
        self._status = None
        self._t0 = time.perf_counter()
        self._ttft = None
        path = urlsplit(self.path).path
        route = self.ROUTES.get(path.rstrip("/") if path != "/" else path)
        try:
            self._answer(path, route)
        finally:
            if route is not None and route[1] != "_metrics" and self._status is not None:
                self.server.metrics.observe(path.rstrip("/"), self._status, time.perf_counter() - self._t0,
                                            self._ttft)

    def _answer(self, path, route):
        try:
            if route is None:
                raise ApiError(404, f"no route {path}: this server has POST /v1/completions, POST "
                                    f"/v1/chat/completions, GET /v1/models, POST /tokenize, POST /detokenize, "
                                    f"GET /health and GET /metrics", code="not_found")
            method, name, needs_key = route
            if self.command != method:
                raise ApiError(405, f"{path} takes {method}, not {self.command}", code="method_not_allowed")
            if needs_key and not self._authorized():
                raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            with self.server._track():
                getattr(self, name)()
        except ApiError as e:
            if self._headers_sent:
                self._stream_error(e)
            else:
                extra = {"Allow": route[0]} if e.status == 405 else {}
                if e.status == 401:
                    extra["WWW-Authenticate"] = "Bearer"
                self._json(e.status, e.body(), extra)
        except (_ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            if self._gen is not None:
                self._gen.close()
                self.log_message("client went away: its request was cancelled after %d tokens",
                                 self._gen.completion_tokens)
        except Exception as e:     # a bug of ours: the client still gets an answer, the log the traceback
            import traceback
            traceback.print_exc()
            if self._gen is not None:
                self._gen.close()
            err = ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
            try:
                if self._headers_sent:
                    self._stream_error(err)
                else:
                    self._json(500, err.body())
            except OSError:
                self.close_connection = True

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        got = self.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _json(self, status: int, obj: dict, extra: dict | None = None):
        data = json.dumps(obj).encode()
        self._status = status
        if not self._body_read and self.command == "POST":
            # the body we did not read would be parsed as the next request
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length (chunked request bodies are not accepted)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a POST needs a Content-Length header")
        if not (length.strip().isascii() and length.strip().isdigit()):
            raise ApiError(400, f"Content-Length {length!r} is not a number of bytes")
        n = int(length)
        if n > self.server.max_body:
            raise ApiError(413, f"the request body is {n} bytes; the limit is {self.server.max_body}",
                           code="request_too_large")
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) < n:
            raise _ClientGone()
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _client_gone(self) -> bool:
        """The peer closed its end: EOF (or an error) waiting on the socket while we have not read it."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _check_engine(self):
        engine = self.server.engine
        if engine is None or not engine.alive:
            raise unavailable(f"the engine is not running: {getattr(engine, 'error', None) or 'not started'}")

    # ---- server-sent events

    def _start_stream(self):
        self._status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:    # no chunking in HTTP/1.0: the end of the stream is the end of the connection
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True

    def _write_event(self, data: str):
        raw = f"data: {data}\n\n".encode()
        if self._chunked:
            raw = b"%x\r\n%s\r\n" % (len(raw), raw)
        self.wfile.write(raw)
        self.wfile.flush()

    def _end_stream(self):
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _stream_error(self, e: ApiError):
        """After the 200 went out an error can only be an event; the client's SDK raises on it."""
        try:
            err = e.body()
            err["error"]["code"] = e.status
            self._write_event(json.dumps(err))
            self._end_stream()
        except OSError:
            pass
        self.close_connection = True

    # ---- endpoints

    def _health(self):
        engine = self.server.engine
        if engine is not None and engine.alive:
            self._json(200, {"status": "ok"})
        else:
            self._json(503, {"status": "error", "error": getattr(engine, "error", None) or "not started"})

    def _metrics(self):
        data, ctype = self.server.metrics.exposition()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._headers_sent = True
        if self.command != "HEAD":
            self.wfile.write(data)

    def _embeddings(self):
        """OpenAI's /v1/embeddings: each input's mean-pooled final hidden state (after the model's
        last norm), float32, one engine request each (batched like any other)."""
        self._check_engine()
        body = self._read_json()
        self._check_model(body)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"'encoding_format' must be \"float\" or \"base64\", got {json.dumps(fmt)}",
                           "encoding_format")
        if body.get("dimensions") is not None:
            raise ApiError(400, "'dimensions' is not supported: the embedding is the model's hidden size",
                           "dimensions")
        inputs = prompt_ids({"prompt": body.get("input")}, self.server.tokenizer, self.server.add_bos,
                            field="input")
        engine = self.server.engine
        reqs = []
        try:
            for ids in inputs:
                if not ids:
                    raise ApiError(400, "an 'input' is empty", "input")
                try:
                    reqs.append(engine.submit(ids, Params(max_tokens=1, embed=True)))
                except ValueError as e:
                    raise ApiError(400, str(e), "input") from None
                except EngineError as e:
                    raise unavailable(str(e)) from None
            data = []
            for i, r in enumerate(reqs):
                for _ in r.stream(timeout=600):
                    pass
                if r.embedding is None:
                    raise unavailable(engine.error or "the engine stopped")
                vec = r.embedding.astype("<f4")
                emb = base64.b64encode(vec.tobytes()).decode() if fmt == "base64" else vec.tolist()
                data.append({"object": "embedding", "index": i, "embedding": emb})
        finally:
            for r in reqs:
                if r.finish is None:
                    r.cancel()
        n = sum(len(ids) for ids in inputs)
        self._json(200, {"object": "list", "data": data, "model": self.server.model_name,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _tokenize(self):
        """vLLM's /tokenize: a prompt (add_special_tokens: the BOS that --add-bos would put) or chat
        messages rendered by the template (add_generation_prompt, default true)."""
        body = self._read_json()
        tok = self.server.tokenizer
        if "messages" in body:
            tpl = self._template()
            add = _flag(body, "add_generation_prompt", True)
            try:
                ids = tok.encode(tpl.render(chat_messages(body), add_generation_prompt=add))
            except ChatTemplateError as e:
                raise ApiError(400, str(e), "messages") from None
        elif isinstance(body.get("prompt"), str):
            ids = tok.encode(checked_text(body["prompt"], "prompt"),
                             add_bos=_flag(body, "add_special_tokens", self.server.add_bos))
        else:
            raise ApiError(400, "send 'prompt' (a string) or 'messages' (a chat)", "prompt")
        engine = self.server.engine
        self._json(200, {"count": len(ids), "max_model_len": engine.max_len if engine is not None else None,
                         "tokens": ids})

    def _detokenize(self):
        body = self._read_json()
        ids = body.get("tokens")
        vocab = getattr(self.server.engine, "vocab", None) or self.server.tokenizer.vocab_size
        if not (isinstance(ids, list) and all(is_int(i) and 0 <= i < vocab for i in ids)):
            raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        self._json(200, {"prompt": self.server.tokenizer.decode(ids)})

    def _template(self):
        tpl = self.server.chat_template
        if tpl is None:
            raise ApiError(400, f"the model {self.server.model_name!r} has no chat template (no chat_template in "
                                f"its tokenizer_config.json or chat_template.jinja): use /v1/completions",
                           code="no_chat_template")
        return tpl

    def _models(self):
        s = self.server
        self._json(200, {"object": "list", "data": [{
            "id": s.model_name, "object": "model", "created": s.created, "owned_by": "cke-dist",
            "max_model_len": s.engine.max_len if s.engine is not None else None}]})

    def _request(self, chat: bool) -> tuple[dict, Sampling]:
        self._check_engine()
        body = self._read_json()
        s = Sampling(body, chat=chat)
        self._check_model(body)
        return body, s

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.server.model_name:     # as OpenAI and vLLM: a typo is not served
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {self.server.model_name!r} "
                                f"(GET /v1/models)", "model", code="model_not_found")

    def _completions(self):
        body, s = self._request(chat=False)
        prompts = prompt_ids(body, self.server.tokenizer, self.server.add_bos)
        self._generate(prompts, s, chat=False, field="prompt")

    def _chat(self):
        body, s = self._request(chat=True)
        msgs = chat_messages(body)
        tpl = self._template()
        try:
            text = tpl.render(msgs, add_generation_prompt=True, tools=s.tools)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        self._generate([self.server.tokenizer.encode(text)], s, chat=True, field="messages")

    def _generate(self, prompts: list[list[int]], s: Sampling, chat: bool, field: str):
        """Choices i * n + j: prompt i's j-th sample (seed + j), all submitted before any is read."""
        ctx = self.server.engine.max_len
        M = s.max_tokens
        for ids in prompts:
            P = len(ids)
            if P == 0:
                raise ApiError(400, f"the {field} is empty: generation needs at least one token to start from",
                               field)
            m = M if M is not None else (max(ctx - P, 1) if chat else COMPLETIONS_DEFAULT_MAX_TOKENS)
            if P + m > ctx:
                raise ApiError(400, f"This model's maximum context length is {ctx} tokens; you requested {P + m} "
                                    f"tokens ({P} in the {field}, {m} for the completion). Shorten the {field} or "
                                    f"lower max_tokens.", "max_tokens" if M is not None else field,
                               code="context_length_exceeded")
        echo_scores = s.echo and s.logprobs is not None
        gens: list[Generation] = []
        try:
            for ids in prompts:
                s.max_tokens = M if M is not None else (max(ctx - len(ids), 1) if chat
                                                        else COMPLETIONS_DEFAULT_MAX_TOKENS)
                for j in range(s.n):
                    seed = None if s.seed is None else s.seed + j
                    gens.append(Generation(self.server, ids, s, self._client_gone, seed, echo_scores))
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            if s.stream:
                self._send_stream(rid, gens, s, chat)
            else:
                self._send_whole(rid, gens, s, chat)
        finally:
            for g in gens:
                g.close()

    def _envelope(self, rid: str, chat: bool, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.server.model_name,
                "system_fingerprint": self.server.fingerprint}

    def _usage(self, gens: list[Generation], s: Sampling) -> dict:
        prompt = sum(g.prompt_tokens for g in gens[::s.n])     # each prompt once, as OpenAI counts it
        done = sum(g.completion_tokens for g in gens)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _echo(self, gen: Generation) -> str:
        return self.server.tokenizer.decode(gen.prompt_ids)

    def _send_whole(self, rid: str, gens: list[Generation], s: Sampling, chat: bool):
        tok = self.server.tokenizer
        choices = []
        for index, gen in enumerate(gens):
            self._gen = gen
            text, ks = [], []
            for i, (piece, k) in enumerate(gen.pieces()):
                if self._ttft is None:
                    self._ttft = time.perf_counter() - self._t0
                text.append(piece)
                ks += k
                if i % 8 == 7 and self._client_gone():   # nobody to answer: free the slot now
                    raise _ClientGone()
            text = "".join(text)
            choice = {"index": index, "logprobs": None, "finish_reason": gen.finish}
            scored = gen.scored(ks) if s.logprobs is not None else None
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                calls = _tool_calls(text, gen.finish) if s.tool_schema is not None else None
                if calls:
                    choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                    choice["finish_reason"] = "tool_calls"
                if scored is not None:
                    choice["logprobs"] = {"content": chat_logprobs(tok, scored), "refusal": None}
            else:
                prefix = self._echo(gen) if s.echo else ""
                choice["text"] = prefix + text
                if scored is not None:
                    choice["logprobs"] = completion_logprobs(tok, (gen.prompt_scored() if s.echo else []) + scored)
            choices.append(choice)
        self._json(200, {**self._envelope(rid, chat, False), "choices": choices, "usage": self._usage(gens, s)})

    def _send_stream(self, rid: str, gens: list[Generation], s: Sampling, chat: bool):
        """The choices one after another (each ran in the engine's batch meanwhile), chunks tagged
        with their index."""
        tok = self.server.tokenizer
        streams = [gen.pieces() for gen in gens]
        self._gen = gens[0]
        first = next(streams[0], None)        # an engine failure up to here is still a plain 503
        self._ttft = time.perf_counter() - self._t0

        def chunk(index, text=None, finish=None, role=False, scored=None, offset=0):
            lp = None
            if scored is not None:
                lp = {"content": chat_logprobs(tok, scored)} if chat else completion_logprobs(tok, scored, offset)
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
            out = {**self._envelope(rid, chat, True), "choices": [choice]}
            if s.include_usage:
                out["usage"] = None
            self._write_event(json.dumps(out))

        self._start_stream()
        for index, (gen, pieces) in enumerate(zip(gens, streams)):
            self._gen = gen
            want = s.logprobs is not None
            offset = 0
            if chat:
                chunk(index, role=True)
            head = first if index == 0 else next(pieces, None)
            if s.echo:      # the prompt first, as vLLM streams an echo
                text = self._echo(gen)
                chunk(index, text, scored=gen.prompt_scored() if want else None)
                offset = len(text)
            held = []     # a forced tool call is sent whole, as one tool_calls delta at the end
            for piece, k in itertools.chain([head] if head is not None else [], pieces):
                if s.tool_schema is not None:
                    held.append(piece)
                elif piece or (k and want):
                    scored = gen.scored(k) if want else None
                    chunk(index, piece, scored=scored, offset=offset)
                    offset += len(piece)
            calls = _tool_calls("".join(held), gen.finish) if s.tool_schema is not None else None
            if calls:
                delta = {"tool_calls": [{"index": 0, **calls[0]}]}
                self._write_event(json.dumps({**self._envelope(rid, chat, True), "choices": [
                    {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}))
                chunk(index, None, "tool_calls")
            else:
                if held:
                    chunk(index, "".join(held))
                chunk(index, None, gen.finish)
        if s.include_usage:
            self._write_event(json.dumps({**self._envelope(rid, chat, True), "choices": [],
                                          "usage": self._usage(gens, s)}))
        self._write_event("[DONE]")
        self._end_stream()

