"""Chat data: JSON lines of {"messages": [{"role", "content"}, ...]} rendered with the model's own
chat template (as transformers' apply_chat_template renders them: cke_dist.serving.chat), one
conversation per row (or several, packed), trained on the assistant's tokens only.

Rules this module keeps:
- The assistant's tokens are found by rendering: turn i's text is what rendering messages[:i+1]
  adds to rendering messages[:i] with the generation prompt (the template's own header for the
  reply stays context); tokens whose text starts inside such a span are targets, everything
  else (system, user, headers, padding) is -100. The turn's end-of-turn token is in its span, so
  the model learns to stop. A template that does not render a conversation as a growing prefix
  is an error naming the line, not a silently wrong mask.
- A row is one conversation, cut to seq_len + 1 tokens (counted in `truncated`) and padded with
  targets -100; causal attention keeps padding from touching the tokens before it.
- Packed (`data.pack`): conversations fill rows greedily in file order, each whole (one longer
  than a row is cut, alone in its row, as unpacked), padding only at a row's end; each row has
  positions restarting at every conversation, so the model attends within a conversation only,
  and a conversation's first token is never a target (the previous one's last token does not
  learn to predict it): a packed batch has exactly the unpacked rows' targets.
- The validation split is a split of conversations, made before packing.
- A global batch is a function of (seed, split, step) only, as for text (cke_dist.train.data):
  rows drawn without replacement from the conversations.
Tests: tests/integration/test_finetune.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cke_dist.serving.chat import ChatTemplateError
from cke_dist.train.data import DataError, data_files, micro_batch_rows

IGNORE = -100


def conversations(path: Path):
    """(line number, messages) of each line of a chat JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line).get("messages")
            except (json.JSONDecodeError, AttributeError):
                raise DataError(f"{path}:{n}: not a JSON object; chat data holds one {{\"messages\": [...]}} "
                                f"per line") from None
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise DataError(f"{path}:{n}: \"messages\" must be a non-empty list of {{\"role\": str, "
                                f"\"content\": str}} objects")
            yield n, msgs


def render(template, tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """(token ids of the rendered conversation, whether each token is the assistant's)."""
    try:
        text = template.render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = template.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = template.render(messages[:i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise DataError(f"{where}: the chat template does not render this conversation as a growing "
                                f"prefix, so the assistant's tokens cannot be told apart")
            spans.append((len(before), len(upto)))
    except ChatTemplateError as e:
        raise DataError(f"{where}: {e}") from None
    enc = tokenizer.encode_with_offsets(text)
    return [i for i, _ in enc], [any(a <= start < b for a, b in spans) for _, start in enc]


def read_chats(files: list[Path], template, tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Every conversation of the files in order, rendered (see `render`)."""
    return [render(template, tokenizer, msgs, f"{f}:{n}") for f in files for n, msgs in conversations(f)]


class ChatRows:
    """Rendered conversations as rows of seq_len + 1 token ids, a target mask and, packed, positions."""

    def __init__(self, convs: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, pack: bool = False):
        n = seq_len + 1
        self.conversations, self.truncated = len(convs), sum(len(t) > n for t, _ in convs)
        rows: list[list[tuple[list[int], list[bool]]]] = []
        used = 0
        for toks, own in convs:
            toks, own = toks[:n], own[:n]
            if pack and rows and used + len(toks) <= n:
                rows[-1].append((toks, own))
                used += len(toks)
            else:
                rows.append([(toks, own)])
                used = len(toks)
        self.ids = np.full((len(rows), n), pad_id, np.int64)
        self.mask = np.zeros((len(rows), n), bool)
        self.pos = np.tile(np.arange(n), (len(rows), 1)) if pack else None
        for r, row in enumerate(rows):
            o = 0
            for toks, own in row:
                self.ids[r, o:o + len(toks)] = toks
                self.mask[r, o + 1:o + len(own)] = own[1:]
                if pack:
                    self.pos[r, o:] = np.arange(n - o)   # the padding after the last one counts on
                o += len(toks)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, idx) -> tuple[np.ndarray, ...]:
        """(inputs, targets[, positions]) int64 (rows, seq_len) of the rows idx; targets -100 outside
        the assistant's tokens."""
        ids, mask = self.ids[idx], self.mask[idx]
        out = (ids[:, :-1], np.where(mask[:, 1:], ids[:, 1:], IGNORE))
        return out if self.pos is None else (*out, self.pos[idx][:, :-1])


def open_chat(path, template, tokenizer, seq_len: int, val_fraction: float, val_path=None,
              pack: bool = False) -> tuple[ChatRows, ChatRows]:
    """(training rows, validation rows): the last val_fraction of the conversations, or val_path's."""
    if template is None:
        raise DataError("data.format = \"chat\" needs the model's chat template (chat_template.jinja, or "
                        "tokenizer_config.json's chat_template, or a GGUF file's); this model has none")
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    convs = read_chats(data_files(path), template, tokenizer)
    if val_path:
        train, val = convs, read_chats(data_files(val_path), template, tokenizer)
    else:
        n_val = int(len(convs) * val_fraction)
        train, val = convs[:len(convs) - n_val], convs[len(convs) - n_val:]
    return ChatRows(train, seq_len, pad, pack), ChatRows(val, seq_len, pad, pack)


class ChatSampler:
    """Global batches of `rows` conversations from one split; the interface of data.BatchSampler."""

    def __init__(self, data: ChatRows, rows: int, seed: int, split: int, path=None):
        self.data, self.rows, self.seed, self.split = data, rows, seed, split
        if len(data) < rows:
            what = f"{len(data)} packed rows ({data.conversations} conversations)" if data.pos is not None \
                else f"{len(data)} conversations"
            raise DataError(f"{path or 'chat data'}: {what}, fewer than the {rows} rows of one "
                            f"global batch; use more data or a smaller data.batch_size * data.grad_accum")

    def fixed_set(self, n_tokens: int) -> tuple[np.ndarray, ...]:
        """(inputs, targets[, positions]) of the first rows (conversations, unpacked), n_tokens // seq_len
        of them (at least one)."""
        seq_len = self.data.ids.shape[1] - 1
        return self.data.rows(slice(0, max(1, min(n_tokens // seq_len, len(self.data)))))

    def order(self, step: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.split, step]).choice(len(self.data), self.rows, replace=False)

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[np.ndarray, ...]:
        """(inputs, targets[, positions]) int64 (rows, seq_len); targets -100 outside the assistant's tokens."""
        return self.data.rows(self.order(step)[rows])

    def micro_batch(self, step: int, micro: int, micro_rows: int, rank: int = 0, world_size: int = 1):
        return self.batch(step, micro_batch_rows(micro, micro_rows, rank, world_size))
