"""Chat prompts: a model directory's chat template, rendered as `transformers` renders it.

    tpl = load_chat_template(model_dir)          # None: the directory names no template
    text = tpl.render([{"role": "user", "content": "hi"}])     # add_generation_prompt=True
    ids = tokenizer.encode(text)                 # the template placed the special tokens already

Rules it keeps:
- The template comes from `chat_template.jinja` (what transformers >= 4.43 writes) or else
  `tokenizer_config.json`'s "chat_template" (a string, or a list of {name, template}: "default").
- Rendering matches `AutoTokenizer.apply_chat_template(messages, tokenize=False,
  add_generation_prompt=True)`: jinja2's ImmutableSandboxedEnvironment (templates are code from
  strangers) with trim_blocks and lstrip_blocks and the loopcontrols extension; globals
  raise_exception, strftime_now, dict, namespace; a `tojson` that does not HTML-escape; variables
  messages, add_generation_prompt, tools (the request's, else None), documents (None) and the special tokens (bos_token,
  eos_token, unk_token, pad_token) as strings. Keys whose value is None are dropped from messages.
- A template's own raise_exception (e.g. "roles must alternate") is a ChatTemplateError: the
  client's messages are at fault, so the server answers 400 with its message.
Tests: tests/integration/test_serve.py (against transformers on a ChatML template and a multi-line one).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from cke_dist.formats.gguf import gguf_special_tokens, is_gguf
from cke_dist.formats.tokenizer import chat_template_source

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """The messages do not fit the template (its raise_exception, or a render error)."""


def _token_text(value) -> str | None:
    if isinstance(value, dict):   # {"content": "<s>", "lstrip": false, ...} in tokenizer_config.json
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(model_dir) -> "ChatTemplate | None":
    """The model's chat template (None: it has none): a directory's, or a GGUF file's metadata."""
    source = chat_template_source(model_dir)
    if source is None:
        return None
    if is_gguf(model_dir):
        return ChatTemplate(source, gguf_special_tokens(model_dir))
    tc = Path(model_dir) / "tokenizer_config.json"
    try:
        cfg = json.loads(tc.read_text(encoding="utf-8")) if tc.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{tc}: not valid JSON ({e})") from e
    specials = {k: _token_text(cfg.get(k)) for k in SPECIAL_TOKENS}
    return ChatTemplate(source, {k: v for k, v in specials.items() if v is not None})


def _environment():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install 'cke-dist[serve]'") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # `dict(...)` for templates without handing them the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # underscore attributes on a namespace are the way out of the sandbox
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict | None = None):
        import jinja2
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        import jinja2
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(messages=plain, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError) as e:
            # TemplateError covers raise_exception and the sandbox's SecurityError; TypeError is a
            # message field of a type the template cannot use (content parts where it adds strings)
            raise ChatTemplateError(f"the chat template refused these messages: {e}") from e
