"""The OpenAI request protocol of `cke-dist serve`: each request body checked field by field into
what the engine needs, or an ApiError naming the field (OpenAI's error object: message, type,
param, code). Features we do not have are a 400, never silently dropped; unknown fields are ignored.
The server (http.py) owns sockets, streaming and the engine. Tests: tests/integration/test_serve.py.
"""
from __future__ import annotations

import json
import math

COMPLETIONS_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 16
# OpenAI's message roles ("developer" is the newer name for "system"); tool results need tools
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, kind="server_error", code="engine_unavailable")


# ---- field checks: each names the field it refuses ----------------------------------------------

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt_int(body: dict, name: str, lo: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    if not is_int(v) or (lo is not None and v < lo):
        want = "an integer" + (f" >= {lo}" if lo is not None else "")
        raise ApiError(400, f"'{name}' must be {want}, got {json.dumps(v)}", name)
    return v


def _opt_num(body: dict, name: str, ok, want: str):
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v) or not ok(v):
        raise ApiError(400, f"'{name}' must be {want}, got {json.dumps(v)}", name)
    return float(v)


def _opt_bool(body: dict, name: str):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(v)}", name)
    return v


def checked_text(text: str, field: str) -> str:
    """The text itself, or a 400 when it is not valid Unicode: JSON can carry a lone UTF-16 surrogate
    ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{field}' is not valid Unicode text: a lone surrogate "
                            f"U+{ord(text[e.start]):04X} at character {e.start}; send the text as UTF-8 "
                            f"(surrogates come only in pairs)", field) from None
    return text


def _unsupported(body: dict, name: str, neutral, what: str):
    """A feature this server does not implement: accept only its neutral values."""
    v = body.get(name)
    if v is not None and v not in neutral:
        raise ApiError(400, f"'{name}' is not supported by this server ({what})", name)


def _stop_strings(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, f"'stop' must be a string or a list of strings, got {json.dumps(v)}", "stop")
    for s in v:
        checked_text(s, "stop")
    if len(v) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' has {len(v)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    return v


class Sampling:
    """What a request asks for, checked; max_tokens None = the endpoint's default."""

    def __init__(self, body: dict, chat: bool):
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise ApiError(400, f"'model' must be a string, got {json.dumps(body['model'])}", "model")
        n = _opt_int(body, "n", 1)
        if n not in (None, 1):
            raise ApiError(400, f"'n' must be 1: this server returns one choice per request, got {n}", "n")
        _unsupported(body, "best_of", (1,), "one choice per request")
        _unsupported(body, "echo", (False,), "the prompt is not echoed")
        _unsupported(body, "suffix", ("",), "no insertion")
        _unsupported(body, "logprobs", (False, 0) if not chat else (False,), "no log probabilities")
        _unsupported(body, "top_logprobs", (0,), "no log probabilities")
        _unsupported(body, "presence_penalty", (0, 0.0), "no penalties")
        _unsupported(body, "frequency_penalty", (0, 0.0), "no penalties")
        _unsupported(body, "logit_bias", ({},), "no logit bias")
        _unsupported(body, "tools", ([],), "no tool calls")
        _unsupported(body, "functions", ([],), "no function calls")
        _unsupported(body, "response_format", ({"type": "text"},), "plain text only")
        self.max_tokens = _opt_int(body, "max_tokens", 1)
        if chat:   # the newer name for the same limit wins
            self.max_tokens = _opt_int(body, "max_completion_tokens", 1) or self.max_tokens
        t = _opt_num(body, "temperature", lambda v: v >= 0, "a number >= 0 (0 = greedy)")
        self.temperature = 1.0 if t is None else t
        self.top_p = _opt_num(body, "top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
        top_k = _opt_int(body, "top_k")
        if top_k is not None and top_k < -1:
            raise ApiError(400, f"'top_k' must be an integer >= 1, or 0 or -1 for no limit, got {top_k}", "top_k")
        self.top_k = top_k if top_k is not None and top_k >= 1 else None    # 0 and -1 mean no limit (vLLM)
        self.seed = _opt_int(body, "seed", 0)
        # vLLM's extension: generate max_tokens whatever the model says (benchmarks want fixed lengths)
        self.ignore_eos = bool(_opt_bool(body, "ignore_eos"))
        self.stop = _stop_strings(body)
        self.stream = bool(_opt_bool(body, "stream"))
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError(400, f"'stream_options' must be an object, got {json.dumps(opts)}", "stream_options")
        self.include_usage = bool(_opt_bool(opts or {}, "include_usage"))


def prompt_ids(body: dict, tokenizer, add_bos: bool) -> list[int]:
    """/v1/completions' prompt: a string, token ids, or a list holding one of either."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return tokenizer.encode(checked_text(p, "prompt"), add_bos=add_bos)
    if isinstance(p, list) and p and all(is_int(i) for i in p):
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(i, (str, list)) for i in p):
        raise ApiError(400, f"'prompt' holds {len(p)} prompts; this server takes one prompt per request", "prompt")
    raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list holding one of either", "prompt")


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        if m["role"] not in ROLES:
            raise ApiError(400, f"messages[{i}].role is {json.dumps(m['role'])}; this server takes "
                                f"{', '.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):   # content parts: this server reads text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(400, f"messages[{i}].content: only parts of type \"text\" are supported", "messages")
            content = "".join(c["text"] for c in content)
        elif not isinstance(content, str):
            # OpenAI allows null only beside tool_calls, which this server does not take
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, got "
                                f"{json.dumps(content)}", "messages")
        out.append({**m, "content": checked_text(content, "messages")})
    return out
