"""Structured output: `response_format` (json_object, json_schema) through grammar-constrained
decoding with llguidance.

    grammars = Grammars(tokenizer, vocab)                 # one per server; the token trie is built once
    c = grammars.constraint({"type": "json_schema", "json_schema": {"schema": {...}}})
    allowed = c.allowed()                                 # bool (vocab,): the tokens the grammar takes next
    c.accept(tok)                                         # after sampling one of them

Why llguidance (measured 2026-12-07 on SmolLM2's 49,152-token vocabulary, a 3-field schema, 32
tokens): llguidance builds its tokenizer in 592 ms, compiles the schema in 4.6 ms and computes a
mask in 33 us (median; 3 ms the first); xgrammar takes 298 ms, 8.8 ms and 8 us. Both cost well
under 1% of a 17 ms decode step; llguidance needs neither torch nor transformers at run time
(xgrammar's masks are torch tensors), so the serving install stays numpy-only. outlines-core was
not measured.

Rules it keeps: the mask applies to the sampler's choice only (log-probabilities stay the
model's); the grammar's end allows only EOS, so a constrained answer ends with finish_reason
"stop" once it is complete; a schema llguidance cannot compile is a 400 naming it.
Tests: tests/integration/test_serve.py (outputs validated with jsonschema).
"""
from __future__ import annotations

import json
import threading

import numpy as np


class GrammarError(ValueError):
    """The response_format cannot be compiled into a grammar."""


class Constraint:
    def __init__(self, matcher, vocab: int):
        import llguidance.numpy as lln
        self.matcher, self.vocab = matcher, vocab
        self._bits = lln.allocate_token_bitmask(1, vocab)
        self._fill = lln.fill_next_token_bitmask

    def allowed(self) -> np.ndarray:
        self._fill(self.matcher, self._bits, 0)
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab].astype(bool)

    def accept(self, tok: int) -> None:
        if not self.matcher.consume_token(int(tok)):
            raise RuntimeError(f"the grammar refused token {tok}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


class Grammars:
    def __init__(self, tokenizer, vocab: int):
        self.tokenizer, self.vocab = tokenizer, vocab
        self._lock = threading.Lock()
        self._ll = None

    def _lltokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance
                raw = getattr(self.tokenizer, "_tok", None)
                if raw is None:
                    raise GrammarError("structured output needs a Hugging Face tokenizer (tokenizer.json); this "
                                       "model has a byte tokenizer")
                self._ll = llguidance.LLTokenizer(raw.to_str(), n_vocab=self.vocab,
                                                  eos_token=list(self.tokenizer.eos_token_ids) or None)
            return self._ll

    def constraint(self, response_format: dict) -> Constraint | None:
        """None for plain text; GrammarError for what cannot be compiled."""
        import llguidance
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise GrammarError("response_format.json_schema.schema must be a JSON schema object")
        else:
            raise GrammarError(f"response_format.type must be text, json_object or json_schema, got "
                               f"{json.dumps(kind)}")
        try:
            # compact separators, no free whitespace: a model that prefers whitespace would loop in
            # it until max_tokens (a schema's own "x-guidance" settings still win)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        except (ValueError, RuntimeError) as e:
            raise GrammarError(f"response_format: the schema cannot be compiled: {e}") from None
        matcher = llguidance.LLMatcher(self._lltokenizer(), grammar)
        if matcher.is_error():
            raise GrammarError(f"response_format: the schema cannot be compiled: {matcher.get_error()}")
        return Constraint(matcher, self.vocab)
