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
MAX_CHOICES = 16         # n
MAX_PROMPTS = 64         # prompts in one /v1/completions request (lm-eval sends batches)
MAX_LOGPROBS = 20        # alternatives per token (OpenAI's chat limit; its completions stop at 5)
# OpenAI's message roles ("developer" is the newer name for "system"; "tool" carries a tool's result)
ROLES = ("system", "developer", "user", "assistant", "tool")


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


def _logit_bias(body: dict) -> dict[int, float] | None:
    v = body.get("logit_bias")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ApiError(400, f"'logit_bias' must be an object of token id -> bias, got {json.dumps(v)}", "logit_bias")
    out = {}
    for k, b in v.items():
        if not (isinstance(k, str) and k.strip().isdigit()) or not _is_num(b) or not -100 <= b <= 100:
            raise ApiError(400, f"'logit_bias' maps token ids (strings of digits) to numbers in [-100, 100], got "
                                f"{json.dumps(k)}: {json.dumps(b)}", "logit_bias")
        out[int(k)] = float(b)
    return out


def _tools(body: dict) -> tuple[list | None, dict | None]:
    """(the tools for the chat template, the JSON schema a forced call must match or None).
    tool_choice "required" or a named function forces a call (a grammar makes the answer one);
    "none" leaves the answer text; "auto", OpenAI's default, would need each model's own
    tool-call syntax parsed out of free text, so it is a 400."""
    tools = body.get("tools")
    if tools is None or tools == []:
        if body.get("tool_choice") not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None, None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) and isinstance(t["function"].get("parameters", {}), dict)
            for t in tools):
        raise ApiError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", "
                            "\"parameters\"}}", "tools")
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return tools, None
    if choice == "required":
        names = list(schemas)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) and \
            choice["function"].get("name") in schemas:
        names = [choice["function"]["name"]]
    elif choice == "auto":
        raise ApiError(400, "'tool_choice' \"auto\" is not supported by this server: send \"required\", a named "
                            "function ({\"type\": \"function\", \"function\": {\"name\": ...}}) or \"none\"",
                       "tool_choice")
    else:
        raise ApiError(400, f"'tool_choice' must be \"none\", \"required\" or name one of the tools "
                            f"({', '.join(schemas)}), got {json.dumps(choice)}", "tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": schemas[n]},
              "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    return tools, (calls[0] if len(calls) == 1 else {"anyOf": calls})


class Sampling:
    """What a request asks for, checked; max_tokens None = the endpoint's default."""

    def __init__(self, body: dict, chat: bool):
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise ApiError(400, f"'model' must be a string, got {json.dumps(body['model'])}", "model")
        n = _opt_int(body, "n", 1)
        self.n = 1 if n is None else n
        if self.n > MAX_CHOICES:
            raise ApiError(400, f"'n' must be at most {MAX_CHOICES}, got {n}", "n")
        best_of = _opt_int(body, "best_of", 1)
        if best_of not in (None, self.n):
            raise ApiError(400, f"'best_of' must equal n ({self.n}): this server returns every sample it draws",
                           "best_of")
        _unsupported(body, "suffix", ("",), "no insertion")
        if chat:
            self.echo = False
            if _opt_bool(body, "logprobs"):
                top = _opt_int(body, "top_logprobs", 0)
                self.logprobs = 0 if top is None else top
            else:
                if body.get("top_logprobs") is not None:
                    raise ApiError(400, "'top_logprobs' needs \"logprobs\": true", "top_logprobs")
                self.logprobs = None
        else:
            self.echo = bool(_opt_bool(body, "echo"))
            self.logprobs = _opt_int(body, "logprobs", 0)
        if self.logprobs is not None and self.logprobs > MAX_LOGPROBS:
            field = "top_logprobs" if chat else "logprobs"
            raise ApiError(400, f"'{field}' must be at most {MAX_LOGPROBS}, got {self.logprobs}", field)
        penalty = lambda v: -2 <= v <= 2      # noqa: E731  (OpenAI's range)
        self.presence_penalty = _opt_num(body, "presence_penalty", penalty, "a number in [-2, 2]") or 0.0
        self.frequency_penalty = _opt_num(body, "frequency_penalty", penalty, "a number in [-2, 2]") or 0.0
        rep = _opt_num(body, "repetition_penalty", lambda v: v > 0, "a number > 0 (1 = none)")
        self.repetition_penalty = 1.0 if rep is None else rep
        self.min_p = _opt_num(body, "min_p", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        self.logit_bias = _logit_bias(body)
        self.tools, self.tool_schema = _tools(body) if chat else (None, None)
        _unsupported(body, "functions", ([],), "no function calls")
        rf = body.get("response_format")
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") in ("text", "json_object", "json_schema")):
            raise ApiError(400, "'response_format' must be {\"type\": \"text\" | \"json_object\" | "
                                "\"json_schema\"}", "response_format")
        self.response_format = None if rf is None or rf.get("type") == "text" else rf
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


def prompt_ids(body: dict, tokenizer, add_bos: bool, field: str = "prompt") -> list[list[int]]:
    """/v1/completions' prompts (or /v1/embeddings' inputs): a string, token ids, or a list of
    either (one choice set each)."""
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(is_int(i) for i in p)):
        p = [p]
    if not (isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and x and
                                                                      all(is_int(i) for i in x)) for x in p)):
        raise ApiError(400, f"'{field}' must be a string, a list of token ids, or a list of either", field)
    if len(p) > MAX_PROMPTS:
        raise ApiError(400, f"'{field}' holds {len(p)} prompts; at most {MAX_PROMPTS} are taken", field)
    return [tokenizer.encode(checked_text(x, field), add_bos=add_bos) if isinstance(x, str) else list(x)
            for x in p]


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
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            out.append(m)       # a call the assistant made earlier: the template renders tool_calls
            continue
        if isinstance(content, list):   # content parts: this server reads text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ApiError(400, f"messages[{i}].content: only parts of type \"text\" are supported", "messages")
            content = "".join(c["text"] for c in content)
        elif not isinstance(content, str):
            # OpenAI allows null only beside an assistant's tool_calls
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, got "
                                f"{json.dumps(content)}", "messages")
        out.append({**m, "content": checked_text(content, "messages")})
    return out
