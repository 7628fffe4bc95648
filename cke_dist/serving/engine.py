"""Continuous-batching decode over a tp x pp grid: the one engine behind `cke-dist generate` and
`cke-dist serve`.

    engine = Engine.build(model_dir, world, tp=2, pp=2, max_batch=16)   # every rank
    if world.rank == 0:                             # the clients in a thread, the loop on the main thread
        def client():
            req = engine.submit(prompt_ids, Params(max_tokens=32, temperature=0))
            for tok in req.stream(): ...            # ids as they are sampled; req.finish: why it ended
            engine.shutdown()                       # every rank's loop returns
        threading.Thread(target=client).start()
    engine.run()                                    # rank 0 plans; the others follow its ticks

The loop belongs on the main thread: numba's OpenMP layer pays about half a millisecond for each
parallel kernel launched from another thread (a decode step launches ~100: measured 20 ms per
token on the main thread, 76 ms off it, SmolLM2 at 1 thread). `start()` runs it in a thread
anyway, for tests and small models.

How a tick goes (`Engine.run`):
- Rank 0 owns the requests. Each tick it plans the work of one micro-batch group (cache slots
  i with i % pp == g, g = tick % pp): every running request of the group feeds its last sampled
  token, and waiting requests join the group's free slots with their whole prompt (prefill rows
  and decode rows in one forward). A request joins and leaves between ticks: continuous batching.
- The plan (token ids, cache slots, positions, which rows need logits) goes to stage 0's tp ranks
  by a broadcast, and down the pipeline with each stage's hidden states: while the last stage
  runs group g's tick, the earlier stages already run the next groups', so with pp groups in
  flight every stage works at once. The last stage's logits (gathered over tp) go to rank 0,
  which samples (each request its own Sampler and seed) before planning that group's next
  tick. Per token only the ids (in the plan) and the hidden states cross the network besides
  tp's two allreduces per layer.
- A decode row may carry prompt-lookup drafts (`speculative_tokens`): the rows they feed come
  back with logits too, and rank 0 keeps each sampled token while it equals the next draft. An
  embedding request's prompt rows come back as one pooled vector (the plan names their range).
- With nothing to do rank 0 still sends an empty plan every `heartbeat` seconds, so no rank sits
  in a receive past the comm deadline; a dead rank surfaces as a CommError in the next tick:
  the engine fails every request with it and stops.
Tests: tests/integration/test_serving.py (one process), tests/ranks/serving_mpi.py via
tests/integration/test_serving.py.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from cke_kernels.decode_matvec import F32_MATVEC_MAX_ROWS

from cke_dist.model import LlamaConfig
from cke_dist.model.layout import Stage, stage_layers, stage_work
from cke_dist.model.load import load_inference_model, read_model_config
from cke_dist.parallel.grid import ProcessGrid
from cke_dist.parallel.pipeline import TICK_BODY, TICK_HEAD, TICK_HIDDEN, TICK_LOGITS, TICK_POOLED
from cke_dist.serving.sampling import Sampler, check_sampling_args, log_softmax, top_logprobs

_STOP = 1
EMBED = "embed"      # an outs entry's kind: the request wants its pooled hidden state, no token


class EngineError(RuntimeError):
    """The engine stopped (a dead rank, a failed step): no request can be served."""


@dataclass
class Params:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple = ()
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict | None = None
    logprobs: int | None = None          # per sampled token: its logprob and this many alternatives
    constraint: object = None            # serving.grammar.Constraint: the tokens a grammar allows
    embed: bool = False                  # no tokens: the prompt's mean final hidden state (req.embedding)
    prompt_logprobs: int | None = None   # the same for each prompt token after the first


class Request:
    """One generation: its prompt, sampler and the events (token ids, then the end) it streams."""

    def __init__(self, rid: int, prompt: list[int], params: Params, limit: int):
        self.id, self.prompt, self.params, self.limit = rid, prompt, params, limit
        self.sampler = Sampler(params.temperature, params.top_k, params.top_p, params.seed, params.min_p,
                               params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
                               params.logit_bias, prompt)
        self.stop_ids = set(int(i) for i in params.stop_ids)
        self.generated: list[int] = []
        # (logprob, [(id, logprob), ...] alternatives) per generated token when params.logprobs is set,
        # appended before the token's event: a reader of the k-th token finds its entry
        self.logprobs: list[tuple[float, list]] = []
        self.prompt_logprobs: list | None = None     # [None, (logprob, alternatives), ...] when asked
        self.embedding: np.ndarray | None = None     # params.embed: (hidden_size,) float32
        self.slot: int | None = None
        self.waiting = False          # a plan with this request's row is in flight
        self.cancelled = False
        self.finish: str | None = None   # "stop", "length", "cancelled", or None while running
        self.events: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        """Stop generating (a client that went away): the slot is freed at the next tick."""
        self.cancelled = True

    def stream(self, timeout: float | None = None):
        """Yield token ids as they are sampled; ends when the request does (see .finish); raises
        EngineError if the engine stops first."""
        while True:
            kind, value = self.events.get(timeout=timeout)
            if kind == "token":
                yield value
            elif kind == "done":
                return
            else:
                raise EngineError(value)


def prompt_lookup(context: list[int], k: int, longest: int = 4, shortest: int = 2) -> list[int]:
    """Up to k draft tokens by prompt lookup (vLLM's ngram drafter): the tokens that followed the
    most recent earlier occurrence of the context's last n tokens, n from `longest` down."""
    if k <= 0:
        return []
    c = np.asarray(context, np.int64)
    T = c.size
    for n in range(min(longest, T - 1), shortest - 1, -1):
        tail = c[T - n:]
        # windows starting at 0..T-n-1 (not the tail itself), most recent first
        win = np.lib.stride_tricks.sliding_window_view(c[:T - 1], n)
        hits = np.flatnonzero((win == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return c[start:start + k].tolist()
    return []


def check_max_len(max_len: int | None, context: int) -> None:
    if max_len is not None and not 1 <= max_len <= context:
        raise ValueError(f"--max-len {max_len}: the model's context is {context} tokens (max_position_embeddings); "
                         f"give at most {context}, or leave it out")


class Engine:
    def __init__(self, im, world, tp_group=None, pp_group=None, max_batch: int = 16, max_len: int | None = None,
                 heartbeat: float = 1.0, speculative_tokens: int = 0):
        self.im, self.world = im, world
        # prompt lookup: up to this many draft tokens per decode row (0: none), kept under the row
        # kernel's limit so a verified row gets the bits a plain decode row gets
        self.speculative_tokens = min(int(speculative_tokens), F32_MATVEC_MAX_ROWS - 1)
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        self.tp_group, self.pp_group = tp_group, pp_group
        self.pp = pp_group.size if pp_group is not None else 1
        self.stage_index = pp_group.rank if pp_group is not None else 0
        check_max_len(max_len, im.max_context)
        self.max_len = max_len or im.max_context
        self.max_batch = max_batch
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.cache = im.new_cache(max_batch, self.max_len)
        self.heartbeat = heartbeat
        self.vocab = im.config.vocab_size
        # rank 0's scheduling state (reentrant: a signal handler on the main thread may shut down while
        # that thread holds it)
        self._cv = threading.Condition(threading.RLock())
        self._waiting: deque[Request] = deque()
        self._slots: list[Request | None] = [None] * max_batch
        self._next_id = 0
        self._stopping = False
        # counters for /metrics (rank 0): tokens in and out, and recent (time, tokens) for a rate
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.draft_tokens_total = 0       # prompt-lookup tokens proposed, and accepted
        self.accepted_tokens_total = 0
        self._recent: deque = deque()
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def build(cls, model_dir, world, tp: int = 1, pp: int = 1, quantize: str | None = None, **kw) -> "Engine":
        """Every rank: its tp shard of its pipeline stage of the model in `model_dir`, read by slice."""

        if world.size != tp * pp:
            raise ValueError(f"--tp {tp} x --pp {pp} = {tp * pp} ranks, but the world has {world.size}: launch "
                             f"with mpiexec -n {tp * pp}")
        grid = ProcessGrid(world, pp=pp, tp=tp)
        raw = {k: v for k, v in read_model_config(model_dir).items() if k != "quantization_config"}
        cfg = LlamaConfig.from_dict(raw)
        check_max_len(kw.get("max_len"), cfg.max_position_embeddings)    # before a byte of weights is read
        l0, l1 = stage_layers(cfg.num_hidden_layers, pp, None, **stage_work(cfg))[grid.pp_rank]
        stage = Stage(l0, l1, grid.pp_rank == 0, grid.pp_rank == pp - 1)
        im = load_inference_model(model_dir, quantize=quantize, tp_group=grid.tp_group, stage=stage)
        return cls(im, world, grid.tp_group if tp > 1 else None, grid.pp_group if pp > 1 else None, **kw)

    # ---- rank 0: requests ------------------------------------------------------------------------

    def submit(self, prompt_ids, params: Params) -> Request:
        """Queue a generation (rank 0). A prompt that leaves no room in the context is a ValueError
        naming both numbers."""
        prompt = [int(i) for i in prompt_ids]
        check_sampling_args(params.temperature, params.top_k, params.top_p)
        if not prompt:
            raise ValueError("the prompt is empty: generation needs at least one token to start from")
        bad = [i for i in prompt if not 0 <= i < self.vocab]
        if bad:
            raise ValueError(f"the prompt has token id {bad[0]} outside the vocabulary [0, {self.vocab})")
        if int(params.max_tokens) != params.max_tokens or params.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {params.max_tokens!r}")
        bad = [i for i in (params.logit_bias or {}) if not 0 <= int(i) < self.vocab]
        if bad:
            raise ValueError(f"logit_bias names token id {bad[0]} outside the vocabulary [0, {self.vocab})")
        room = self.max_len - len(prompt)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_len}, so no "
                             f"token is left to generate")
        with self._cv:
            if self.error is not None:
                raise EngineError(self.error)
            req = Request(self._next_id, prompt, params, min(int(params.max_tokens), room))
            self._next_id += 1
            self._waiting.append(req)
            self._cv.notify()
        return req

    def start(self) -> threading.Thread:
        """Rank 0: run the loop in a thread (its failure fails every request). For tests and small
        models: off the main thread every numba parallel kernel costs ~0.5 ms more (see above)."""
        self._thread = threading.Thread(target=self._run_logged, name="cke-engine", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self, timeout: float | None = None) -> None:
        """Rank 0, from any thread: cancel what runs, let the pipeline drain, stop every rank's loop
        (waits for the loop's thread when start() made one)."""
        with self._cv:
            self._stopping = True
            for r in list(self._waiting) + [r for r in self._slots if r is not None]:
                r.cancel()
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run_main(self) -> None:
        """Rank 0 on the main thread: run the loop; if it fails, every request learns why, then the
        error propagates."""
        try:
            self.run()
        except BaseException as e:
            self._fail(f"the engine stopped: {type(e).__name__}: {e}")
            raise

    def _run_logged(self):
        try:
            self.run()
        except BaseException as e:   # the thread's end: every request learns why
            self._fail(f"the engine stopped: {type(e).__name__}: {e}")

    def _fail(self, message: str) -> None:
        with self._cv:
            self.error = message
            for r in list(self._waiting) + [r for r in self._slots if r is not None]:
                if r.finish is None:
                    r.finish = "error"
                    r.events.put(("error", message))
            self._waiting.clear()
            self._slots = [None] * self.max_batch

    @property
    def alive(self) -> bool:
        return self.error is None and not (self._thread is not None and not self._thread.is_alive())

    # ---- every rank: the tick loop ---------------------------------------------------------------

    def run(self) -> None:
        """Every rank's loop. Rank 0 plans; stage 0's tp ranks get each plan by a tp broadcast; a
        later stage gets it from the stage before, with that stage's hidden states, in the order
        they were sent (so every link carries one ordered stream); the last stage's tp rank 0 sends
        logits back to rank 0. Sends are asynchronous (copies), so no stage waits on a slower one
        downstream while holding what an upstream one needs."""
        rank0 = self.world.rank == 0
        first, last = self.stage_index == 0, self.stage_index == self.pp - 1
        inflight: list[list | None] = [None] * self.pp      # rank 0: per group, the requests awaiting logits
        self._sends: list = []
        tick = 0
        try:
            while True:
                g = tick % self.pp
                outs = None
                if rank0:
                    if self.pp > 1 and inflight[g] is not None:
                        n_rows = sum(k for _, k, _ in inflight[g])
                        n_pool = sum(d == EMBED for _, _, d in inflight[g])
                        logits = np.empty((n_rows, self.vocab), np.float32)
                        if n_rows:
                            self.pp_group.recv(logits, self.pp - 1, tag=TICK_LOGITS)
                        pooled = np.empty((n_pool, self.im.config.hidden_size), np.float32)
                        if n_pool:
                            self.pp_group.recv(pooled, self.pp - 1, tag=TICK_POOLED)
                        self._deliver(inflight[g], logits, pooled)
                        inflight[g] = None
                    plan, outs = self._plan(g, any(x is not None for x in inflight))
                else:
                    plan = None
                if first:
                    plan = self._tp_broadcast(plan)
                    hidden = None
                else:
                    plan, hidden = self._recv_from_previous()
                if plan is None:
                    if not last:
                        self._send_next(None, None)
                    return
                out = self._run_stage(plan, hidden)
                if not last:
                    self._send_next(plan, out)
                elif self.pp > 1:
                    if out is not None and (self.tp_group is None or self.tp_group.rank == 0):
                        logits, pooled = out if isinstance(out, tuple) else (out, None)
                        if len(logits):
                            self._post(self.pp_group.send(np.ascontiguousarray(logits, dtype=np.float32), 0,
                                                          tag=TICK_LOGITS, async_op=True))
                        if pooled is not None:
                            self._post(self.pp_group.send(pooled, 0, tag=TICK_POOLED, async_op=True))
                elif rank0 and out is not None:   # pp = 1: rank 0 is the last stage
                    self._deliver(outs, *(out if isinstance(out, tuple) else (out,)))
                    outs = None
                if rank0 and outs:
                    inflight[g] = outs
                tick += 1
        finally:
            for h in self._sends:
                h.wait()

    def _post(self, handle) -> None:
        self._sends = [h for h in self._sends if not h.is_completed()]
        self._sends.append(handle)

    def _run_stage(self, plan, hidden):
        ids, seq, pos, rows, pool = plan
        if seq.size == 0:
            return None
        return self.im.stage_forward(ids if self.stage_index == 0 else hidden, seq, pos, self.cache, logits_rows=rows,
                                     pool=pool.reshape(-1, 2))

    @staticmethod
    def _body_size(head) -> int:
        return 3 * int(head[0]) + int(head[1]) + 2 * int(head[3])

    @staticmethod
    def _pack(plan) -> tuple[np.ndarray, np.ndarray]:
        """head: rows M, logits rows R, stop flag, pooled ranges Q; body: ids, seq, pos (M each),
        logits rows (R), pooled [start, stop) pairs (2Q)."""
        head = np.zeros(4, np.int64)
        if plan is None:
            head[2] = _STOP
            return head, np.empty(0, np.int64)
        head[0], head[1], head[3] = plan[1].size, plan[3].size, plan[4].size // 2
        return head, np.concatenate(plan).astype(np.int64)

    @staticmethod
    def _unpack(head, body):
        if head[2] == _STOP:
            return None
        M, R = int(head[0]), int(head[1])
        return body[:M], body[M:2 * M], body[2 * M:3 * M], body[3 * M:3 * M + R], body[3 * M + R:]

    def _tp_broadcast(self, plan):
        """Rank 0's plan (None: stop) to the other tp ranks of stage 0."""
        if self.tp_group is None:
            return plan
        head, body = self._pack(plan) if self.tp_group.rank == 0 else (np.zeros(4, np.int64), None)
        self.tp_group.broadcast(head, root=0)
        if self.tp_group.rank != 0:
            body = np.empty(self._body_size(head), np.int64)
        if body.size:
            self.tp_group.broadcast(body, root=0)
        return self._unpack(head, body)

    def _send_next(self, plan, out) -> None:
        head, body = self._pack(plan)
        nxt = self.stage_index + 1
        self._post(self.pp_group.send(head, nxt, tag=TICK_HEAD, async_op=True))
        if body.size:
            self._post(self.pp_group.send(body, nxt, tag=TICK_BODY, async_op=True))
        if out is not None:
            self._post(self.pp_group.send(np.array(out, dtype=np.float32), nxt, tag=TICK_HIDDEN, async_op=True))

    def _recv_from_previous(self):
        prev = self.stage_index - 1
        head = np.empty(4, np.int64)
        self.pp_group.recv(head, prev, tag=TICK_HEAD)
        body = np.empty(self._body_size(head), np.int64)
        if body.size:
            self.pp_group.recv(body, prev, tag=TICK_BODY)
        plan = self._unpack(head, body)
        hidden = None
        if plan is not None and plan[1].size:
            hidden = np.empty((plan[1].size, self.im.config.hidden_size), np.float32)
            self.pp_group.recv(hidden, prev, tag=TICK_HIDDEN)
        return plan, hidden

    # ---- rank 0: planning and sampling -----------------------------------------------------------

    def _plan(self, g: int, busy_elsewhere: bool):
        """(ids, seq, pos, logits rows) of group g's next tick and the requests its logits rows are
        for; None to stop. Blocks (up to the heartbeat) while there is nothing at all to do."""
        with self._cv:
            while True:
                self._free_finished()
                running = [r for r in self._slots if r is not None]
                if self._stopping and not running and not busy_elsewhere:
                    return None, None
                if running or self._waiting or busy_elsewhere or self._stopping:
                    break
                if not self._cv.wait(self.heartbeat):
                    break     # idle: an empty tick keeps the followers inside their deadline
            ids, seq, pos, rows, pool, outs = [], [], [], [], [], []
            mine = [i for i in range(self.max_batch) if i % self.pp == g]
            for i in mine:
                r = self._slots[i]
                if r is not None and not r.waiting and r.generated:
                    p = len(r.prompt) + len(r.generated) - 1
                    # drafts stop where the request would: its limit, the context
                    room = min(r.limit - len(r.generated), self.max_len - 1 - p)
                    draft = prompt_lookup(r.prompt + r.generated, min(self.speculative_tokens, room))
                    ids += [r.generated[-1], *draft]
                    seq += [i] * (1 + len(draft))
                    pos += range(p, p + 1 + len(draft))
                    rows += range(len(ids) - 1 - len(draft), len(ids))
                    outs.append((r, 1 + len(draft), draft))
                    r.waiting = True
            for i in mine:
                if self._slots[i] is None and self._waiting and not self._stopping:
                    r = self._waiting.popleft()
                    r.slot, r.waiting = i, True
                    self._slots[i] = r
                    P = len(r.prompt)
                    self.prompt_tokens_total += P
                    ids += r.prompt
                    seq += [i] * P
                    pos += list(range(P))
                    if r.params.embed:
                        pool += [len(ids) - P, len(ids)]
                        outs.append((r, 0, EMBED))
                    elif r.params.prompt_logprobs is not None:    # every prompt row's logits (echo)
                        rows += range(len(ids) - P, len(ids))
                        outs.append((r, P, None))
                    else:
                        rows.append(len(ids) - 1)
                        outs.append((r, 1, None))
        as64 = [np.asarray(a, np.int64) for a in (ids, seq, pos, rows, pool)]
        return tuple(as64), outs

    def _free_finished(self):
        for i, r in enumerate(self._slots):
            if r is not None and not r.waiting and (r.finish is not None or r.cancelled):
                if r.finish is None:
                    r.finish = "cancelled"
                    r.events.put(("done", r.finish))
                self._slots[i] = None
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            r.finish = "cancelled"
            r.events.put(("done", r.finish))

    def _emit(self, r: Request, row) -> int:
        """Sample r's next token from its logits row, score it, hand it to the client."""
        c = r.params.constraint
        if c is not None and c.done:      # the grammar ended without an EOS to sample (ignore_eos)
            r.finish = "stop"
            r.events.put(("done", r.finish))
            return -1
        tok = r.sampler(row, None if c is None else c.allowed())
        r.sampler.accept(tok)
        if c is not None and tok not in r.stop_ids:
            c.accept(tok)
        if r.params.logprobs is not None:
            lp = log_softmax(row)
            r.logprobs.append((float(lp[tok]), top_logprobs(lp, r.params.logprobs)))
        r.generated.append(tok)
        self.generation_tokens_total += 1
        r.events.put(("token", tok))
        if tok in r.stop_ids:
            r.finish = "stop"
        elif len(r.generated) >= r.limit:
            r.finish = "length"
        if r.finish is not None:
            r.events.put(("done", r.finish))
        return tok

    def stats(self, window_s: float = 10.0) -> dict:
        """Rank 0's counters and gauges for /metrics (a snapshot)."""
        now = time.monotonic()
        with self._cv:
            running = [r for r in self._slots if r is not None]
            while self._recent and self._recent[0][0] < now - window_s:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            return {"waiting": len(self._waiting), "running": len(running), "max_batch": self.max_batch,
                    "kv_tokens_used": sum(len(r.prompt) + len(r.generated) for r in running),
                    "kv_tokens_capacity": self.max_batch * self.max_len,
                    "prompt_tokens": self.prompt_tokens_total, "generation_tokens": self.generation_tokens_total,
                    "draft_tokens": self.draft_tokens_total, "accepted_tokens": self.accepted_tokens_total,
                    "tokens_per_second": recent / window_s,
                    "comm_seconds": {name: g.seconds for name, g in (("tp", self.tp_group), ("pp", self.pp_group))
                                     if g is not None}}

    def _deliver(self, reqs, logits, pooled=None):
        """reqs: (request, its number of logits rows, its draft or None) in row order. A new
        request's last row samples (the rows before score its prompt); a decode row samples, and
        while the token it samples equals the next draft token, the row that token fed samples
        the next: each token comes from the logits (and the random draw) plain decoding would use."""
        with self._cv:
            before = self.generation_tokens_total
            at = n_pool = 0
            for r, k, draft in reqs:
                rows, at = logits[at:at + k], at + k
                r.waiting = False
                if draft == EMBED:
                    r.embedding, n_pool = pooled[n_pool].copy(), n_pool + 1
                    if not r.cancelled and r.finish is None:
                        r.finish = "stop"
                        r.events.put(("done", r.finish))
                    continue
                if r.cancelled or r.finish is not None:
                    continue
                if draft is None and k > 1:
                    n = r.params.prompt_logprobs
                    r.prompt_logprobs = [None]
                    for j in range(k - 1):
                        lp = log_softmax(rows[j])
                        r.prompt_logprobs.append((float(lp[r.prompt[j + 1]]), top_logprobs(lp, n)))
                    rows = rows[k - 1:]
                for j, row in enumerate(rows):
                    try:
                        tok = self._emit(r, row)
                    except (ValueError, RuntimeError) as e:    # this request's grammar or sampler: it alone fails
                        r.finish = "error"
                        r.events.put(("error", f"the request failed: {e}"))
                        break
                    if r.finish is not None or not draft or j >= len(draft) or tok != draft[j]:
                        break
                if draft:
                    self.draft_tokens_total += len(draft)
                    self.accepted_tokens_total += j
            self._recent.append((time.monotonic(), self.generation_tokens_total - before))
            self._cv.notify_all()
