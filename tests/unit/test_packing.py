"""Sequence packing (data.pack): several documents in one row, positions restarting per document,
attention never crossing a boundary. A packed row's logits, loss and every gradient are those of
the same documents run unpacked, one per row; the samplers build such rows from text and chat data."""
import numpy as np
import pytest
from tiny import PARITY_CONFIGS, make_model

from cke_dist.train.chat_data import IGNORE, ChatRows, ChatSampler
from cke_dist.train.data import TRAIN, BatchSampler, doc_positions

EOS = 60


def _documents(V, lengths, seed=5):
    """Random (inputs, targets) documents of the given lengths, a few targets ignored as chat data has."""
    r = np.random.default_rng(seed)
    docs = [(r.integers(0, V, n), r.integers(0, V, n)) for n in lengths]
    docs[1][1][2] = docs[-1][1][0] = IGNORE
    return docs


def _packed(docs, rows):
    """rows: how many documents each row takes, in order -> (inputs, targets, positions) (len(rows), T)."""
    out, i = [], 0
    for n in rows:
        part = docs[i:i + n]
        i += n
        out.append([np.concatenate(c) for c in zip(*[(x, y, np.arange(len(x))) for x, y in part])])
    return tuple(np.stack(c) for c in zip(*out))


def _unpacked(docs):
    """One document per row, padded at its end (targets ignored)."""
    T = max(len(x) for x, _ in docs)
    x, y = np.zeros((len(docs), T), np.int64), np.full((len(docs), T), IGNORE)
    for r, (dx, dy) in enumerate(docs):
        x[r, :len(dx)], y[r, :len(dy)] = dx, dy
    return x, y


@pytest.mark.parametrize("kind", list(PARITY_CONFIGS))
def test_packed_rows_equal_the_documents_unpacked(kind):
    """Two rows of 12 tokens holding 3 and 2 documents: the logits of each document, the loss (the mean
    over every valid target) and every named gradient equal the unpacked run's."""
    model = make_model(kind)
    docs = _documents(model.config.vocab_size, [5, 4, 3, 7, 5])
    x, y, pos = _packed(docs, [3, 2])
    xu, yu = _unpacked(docs)

    logits = model.forward(x, positions=pos).reshape(-1, model.config.vocab_size)
    logits_u = model.forward(xu)
    starts = np.cumsum([0] + [len(d) for d, _ in docs])
    for r, (dx, _) in enumerate(docs):
        np.testing.assert_allclose(logits[starts[r]:starts[r + 1]], logits_u[r, :len(dx)], rtol=1e-5, atol=1e-5)

    model.zero_grad()
    loss = model.forward_backward(x, y, positions=pos)
    grads = {n: g.copy() for n, g in model.named_grads.items()}
    model.zero_grad()
    loss_u = model.forward_backward(xu, yu)
    assert loss == pytest.approx(loss_u, rel=1e-5)
    assert loss == pytest.approx(model.loss(x, y, positions=pos), rel=1e-6)
    for name, g in model.named_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-5, atol=1e-6 * np.abs(g).max(), err_msg=name)
    # the same rows without positions (documents seeing each other) are another function
    assert np.abs(model.forward(x).reshape(logits.shape) - logits).max() > 1e-3


def test_positions_zero_to_t_are_the_plain_model():
    model = make_model("llama-gqa")
    x, y, _ = _packed(_documents(model.config.vocab_size, [6, 6]), [1, 1])
    plain = np.tile(np.arange(6), (2, 1))
    np.testing.assert_array_equal(model.forward(x, positions=plain), model.forward(x))


@pytest.mark.parametrize("pos,match", [
    (np.array([[0, 1, 2]]), r"positions shape \(1, 3\) differs from tokens shape \(1, 4\)"),
    (np.array([[0, 1, 3, 4]]), r"positions\[0, 2\] = 3: a position is 0 .* previous position \+ 1 \(here 1\)"),
    (np.array([[1, 2, 3, 4]]), r"positions\[0, 0\] = 1"),
    (np.array([[0, 1, -1, 0]]), r"positions\[0, 2\] = -1"),
    (np.array([[0.0, 1.0, 0.0, 1.0]]), "positions must be integers"),
])
def test_wrong_positions_are_refused(pos, match):
    model = make_model("llama-gqa")
    x = np.zeros((1, 4), np.int64)
    with pytest.raises(ValueError, match=match):
        model.forward(x, positions=pos)
    with pytest.raises(ValueError, match=match):
        model.forward_backward(x, x, positions=pos)


def test_text_positions_restart_after_each_end_of_text():
    x = np.array([[3, EOS, 5, 6, EOS, EOS, 7], [1, 2, 3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(doc_positions(x, EOS), [[0, 1, 0, 1, 2, 0, 0], list(range(7))])
    tokens = np.arange(200) % 61
    packed, plain = BatchSampler(tokens, 4, 16, 0, TRAIN, eos_id=EOS), BatchSampler(tokens, 4, 16, 0, TRAIN)
    x, y, pos = packed.micro_batch(3, 1, 2)
    x0, y0 = plain.micro_batch(3, 1, 2)     # the same windows: packing only adds their positions
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(pos, doc_positions(x, EOS))
    vx, vy, vpos = packed.fixed_set(48)
    assert vx.shape == vpos.shape == (3, 16)
    np.testing.assert_array_equal(vpos, doc_positions(vx, EOS))


def _chats(V, lengths, seed=3):
    """Rendered conversations: ids and an assistant mask (a reply at the end of each, and the first
    token marked too, which only a packed row could wrongly make a target)."""
    r = np.random.default_rng(seed)
    return [(r.integers(0, V - 1, n).tolist(), [i == 0 or i >= n // 2 for i in range(n)]) for n in lengths]


def test_chat_rows_pack_greedily_in_file_order():
    convs = _chats(61, [6, 5, 9, 3, 14, 2])
    rows = ChatRows(convs, seq_len=11, pad_id=EOS, pack=True)   # rows of 12 tokens
    assert (len(rows), rows.conversations, rows.truncated) == (4, 6, 1)
    # [6 + 5], [9 + 3], [14 cut to 12], [2]: each whole, in order, padding only at the end
    assert rows.ids[0, :11].tolist() == convs[0][0] + convs[1][0] and rows.ids[0, 11] == EOS
    assert rows.ids[1].tolist() == convs[2][0] + convs[3][0]
    assert rows.ids[2].tolist() == convs[4][0][:12]
    assert rows.pos[0].tolist() == list(range(6)) + list(range(6))        # the padding counts on
    assert rows.pos[1].tolist() == list(range(9)) + list(range(3))
    assert rows.pos[3].tolist() == list(range(12))
    # a conversation's first token is never a target: the one before does not learn to predict it
    assert not rows.mask[0, 6] and not rows.mask[1, 9]
    x, y, pos = ChatSampler(rows, 4, 0, TRAIN).fixed_set(11 * 2)
    assert x.shape == y.shape == pos.shape == (2, 11)
    assert (y[0, 5], y[1, 8]) == (IGNORE, IGNORE)


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2"])
def test_packed_chat_rows_loss_and_grads_equal_unpacked(kind):
    """Chat rows of the same conversations, packed and not: the same loss and gradients."""
    model = make_model(kind)
    convs = _chats(model.config.vocab_size, [6, 5, 9, 3, 14, 2, 7])
    packed = ChatRows(convs, seq_len=15, pad_id=EOS, pack=True).rows(slice(None))
    plain = ChatRows(convs, seq_len=15, pad_id=EOS).rows(slice(None))
    assert len(packed[0]) < len(plain[0])
    assert sorted(packed[1][packed[1] != IGNORE]) == sorted(plain[1][plain[1] != IGNORE])
    model.zero_grad()
    loss = model.forward_backward(*packed[:2], positions=packed[2])
    g = model.grads.copy()
    model.zero_grad()
    assert loss == pytest.approx(model.forward_backward(*plain), rel=1e-5)
    np.testing.assert_allclose(g, model.grads, rtol=1e-5, atol=1e-6 * np.abs(g).max())
