"""`cke-dist serve` end to end: the real server as a subprocess (one process, and tp=2 under mpiexec)
on a tiny random Llama with a real (tiny BPE) Hugging Face tokenizer and a ChatML chat template,
driven by the official `openai` client and by raw HTTP.

Every expected text is `cke_dist.serving.generate.generate` on the same prompt ids in this process, decoded
by the same tokenizer. The model is random, so its greedy text is byte soup; that is fine, the
comparison is exact. Some prompts stop on the EOS id early and some never do: the fixtures pick
such prompts by running generate here, so every test knows which case it has.
"""
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mpirun import REPO, THREAD_VARS, mpiexec

openai = pytest.importorskip("openai")
pytest.importorskip("jinja2")
pytest.importorskip("tokenizers")

from tiny import make_tokenizer_dir  # noqa: E402

from cke_dist.formats.tokenizer import load_tokenizer  # noqa: E402
from cke_dist.model import LlamaConfig, Model  # noqa: E402
from cke_dist.model.load import load_inference_model
from cke_dist.serving.chat import ChatTemplateError, load_chat_template  # noqa: E402
from cke_dist.serving.generate import generate  # noqa: E402
from cke_dist.serving.sampling import Sampler, log_softmax  # noqa: E402

CTX = 512
CFG = dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=CTX, rms_norm_eps=1e-5, tie_word_embeddings=True)
API_KEY = "sk-test-0123456789"
MODEL = "tiny-chat"  # the directory's name: what the server answers to
LONG = 480          # tokens of the long requests (the disconnect and dead-rank tests)

# SmolLM2-Instruct's template (Qwen2-Instruct's but for the default system prompt), verbatim
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# block tags on lines of their own (trim_blocks / lstrip_blocks decide its whitespace), a
# namespace, loop controls, tojson on text with < & " and non-ASCII, bos_token, raise_exception
MULTILINE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] | tojson }}<</SYS>>
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
[{{ message['role'] | upper }} {{ ns.turns }}] {{ message['content'] | trim }}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]{% endif %}"""


def make_model_dir(d: Path, template: str | None = SMOL_TEMPLATE) -> Path:
    Model.from_config(LlamaConfig.from_dict(CFG), seed=0, init_std=0.2).save(d)
    write_tokenizer(d, template)
    return d


def write_tokenizer(d: Path, template: str | None):
    from tokenizers import Tokenizer
    make_tokenizer_dir(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])      # ids 300, 301, as in a ChatML vocabulary
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


class ServerProc:
    """`cke-dist serve --port 0` (under `mpiexec -n N` when n is given); the port is read from its banner."""

    def __init__(self, model_dir, *extra, n=None, env=None, mpi_flags=(), marker=None, under_sh=False):
        full = dict(os.environ, CKE_COMM_TIMEOUT="5", CKE_COMM_QUIET="1", PYTHONUNBUFFERED="1", **(env or {}))
        for var in THREAD_VARS:
            full[var] = "1"
        if marker:
            full["CKE_SERVE_TEST_MARK"] = marker
        cmd = [sys.executable, "-m", "cke_dist.cli", "serve", "--model", str(model_dir), "--port", "0", *extra]
        if under_sh:   # a rank's death is then an exit to mpiexec, not a signal it answers by killing the job
            cmd = ["sh", "-c", " ".join(map(shlex.quote, cmd)) + "; exit $?"]
        if n:
            cmd = [mpiexec(), *mpi_flags, "-n", str(n), *cmd]
        self.marker = marker
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(90) or self.port is None:
            self.kill()
            raise AssertionError(f"server did not come up:\n{self.output()[-6000:]}")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"cke-dist serve: http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                self.port = int(m.group(1))
            if "try: curl" in line:
                self._ready.set()
        self._ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def rank_pid(self, rank: int) -> int:
        """The pid of an MPI rank of this job (its environment carries our marker and PMI_RANK)."""
        want = {f"CKE_SERVE_TEST_MARK={self.marker}".encode(), f"PMI_RANK={rank}".encode()}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    env = set((p / "environ").read_bytes().split(b"\0"))
                    argv = (p / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if want <= env and argv[1:3] == [b"-m", b"cke_dist.cli"]:     # python, not an sh around it
                    return int(p.name)
        raise AssertionError(f"no process for rank {rank}")


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def ref(model_dir):
    """The one-process model and tokenizer, and prompts (ids) picked by what greedy does on them."""
    im, tok = load_inference_model(model_dir), load_tokenizer(model_dir)
    eos = tok.eos_token_ids
    rng = np.random.default_rng(0)
    cands = [rng.integers(2, 300, n).tolist() for n in rng.integers(3, 12, 80)]
    outs = [generate(im, p, LONG, temperature=0, stop_ids=eos) for p in cands]
    never_eos = [p for p, o in zip(cands, outs) if len(o) == LONG and eos[0] not in o]
    early_eos = [p for p, o in zip(cands, outs) if len(o) <= 40 and o[-1] == eos[0]]
    assert len(never_eos) >= 6 and early_eos, "the random model no longer gives both kinds of prompt"
    return dict(im=im, tok=tok, eos=eos, plain=never_eos, eos_prompt=early_eos[0])


def expected(ref, ids, n, **sampling):
    """(text, finish_reason, completion_tokens) the server must give for prompt ids."""
    sampling.setdefault("temperature", 0)
    out = generate(ref["im"], ids, n, stop_ids=ref["eos"], **sampling)
    text = ref["tok"].decode([i for i in out if i not in ref["eos"]])
    return text, ("stop" if out and out[-1] in ref["eos"] else "length"), len(out)


@pytest.fixture(scope="module")
def server(model_dir):
    s = ServerProc(model_dir, "--max-batch", "8", env={"CKE_API_KEY": API_KEY})
    yield s
    s.proc.send_signal(signal.SIGTERM)           # an orderly stop: exit 0
    rc = s.wait(30)
    s.kill()
    assert rc == 0, f"exit {rc} after SIGTERM:\n{s.output()[-4000:]}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def raw(port, method, path, body=None, key=API_KEY, headers=None):
    """(status, parsed JSON body) by http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if data else None)


def open_stream(port, body, key=API_KEY, path="/v1/completions"):
    """A raw socket with a streaming request sent; its response not read yet."""
    data = json.dumps({**body, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def read_events(sock, n, got=b""):
    while got.count(b"data: ") < n:
        chunk = sock.recv(65536)
        assert chunk, f"stream ended after {got.count(b'data: ')} events: {got[-500:]!r}"
        got += chunk
    return got


def read_to_end(sock, limit_s):
    """Everything until the peer closes (EOF or reset); fails if it is still open after limit_s."""
    sock.settimeout(limit_s)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got
    except socket.timeout:
        raise AssertionError(f"the stream was still open after {limit_s}s: {got[-500:]!r}") from None


# ---- chat template ------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [SMOL_TEMPLATE, MULTILINE_TEMPLATE], ids=["chatml", "multiline"])
def test_chat_template_renders_as_transformers(tmp_path, template):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path, template)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_chat_template(tmp_path)
    chats = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": 'be <brief> & "exact": née ✓'}, {"role": "user", "content": "  a\nb  "},
         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more", "name": None}],
    ]
    for msgs in chats:
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.render(msgs) == want
    if template is MULTILINE_TEMPLATE:
        assert '"be <brief> & \\"exact\\": née ✓"' in ours.render(chats[1])    # tojson, not HTML-escaped
        import jinja2
        with pytest.raises(jinja2.TemplateError, match="Unknown role: tool"):
            hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
        with pytest.raises(ChatTemplateError, match="Unknown role: tool"):
            ours.render([{"role": "tool", "content": "x"}])


def test_no_template_is_none(tmp_path):
    write_tokenizer(tmp_path, None)
    assert load_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")   # transformers' newer file
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "x"}]) == "x!"


# ---- one process, through the openai client ------------------------------------------------------

def test_completions_greedy_equal_generate(client, ref):
    text = "the quick brown fox"
    ids = ref["tok"].encode(text)
    want, finish, n = expected(ref, ids, 24)
    r = client.completions.create(model="tiny-chat", prompt=text, max_tokens=24, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, finish)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny-chat"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    # token ids as the prompt, and the stream: the same text
    p = ref["plain"][0]
    want, finish, n = expected(ref, p, 30)
    assert finish == "length" and n == 30
    r = client.completions.create(model=MODEL, prompt=p, max_tokens=30, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (want, "length", 30)
    chunks = list(client.completions.create(model=MODEL, prompt=p, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == len(p)


def test_default_max_tokens_and_eos(client, ref):
    p = ref["plain"][1]
    r = client.completions.create(model=MODEL, prompt=p, temperature=0)     # OpenAI's default: 16
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == expected(ref, p, 16)[0]
    want, finish, n = expected(ref, ref["eos_prompt"], 100)
    assert finish == "stop" and n < 100
    r = client.completions.create(model=MODEL, prompt=ref["eos_prompt"], max_tokens=100, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (want, "stop", n)
    assert "<|im_end|>" not in r.choices[0].text


def test_chat_greedy_equal_generate(client, ref, model_dir):
    msgs = [{"role": "user", "content": "to be or not to be"}]
    ids = ref["tok"].encode(load_chat_template(model_dir).render(msgs))
    assert ids.count(300) == 3          # <|im_start|> is one token: the rendered specials were kept
    want, finish, n = expected(ref, ids, 20)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert (r.choices[0].message.role, r.choices[0].message.content) == ("assistant", want)
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == finish and chunks[-1].object == "chat.completion.chunk"
    # no max_tokens in chat: up to the context
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0)
    want, finish, n = expected(ref, ids, CTX - len(ids))
    assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == (want, finish, n)


def test_concurrent_streams_each_equal_their_own_generate(client, ref):
    jobs = [(p, 20 + 7 * i) for i, p in enumerate(ref["plain"][:6])]
    results, errors = [None] * len(jobs), []

    def one(i, p, n):
        try:
            parts, finish = [], None
            for c in client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0, stream=True):
                parts.append(c.choices[0].text)
                finish = c.choices[0].finish_reason or finish
            results[i] = ("".join(parts), finish)
        except Exception as e:       # reported below with the others
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i, p, n)) for i, (p, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == [expected(ref, p, n)[:2] for p, n in jobs]


def test_seed_reproduces_and_equals_generate(client, ref):
    p = ref["plain"][2]
    kw = dict(model=MODEL, prompt=p, max_tokens=25, temperature=0.9, top_p=0.95)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b == expected(ref, p, 25, temperature=0.9, top_p=0.95, seed=7)[0]
    assert c == expected(ref, p, 25, temperature=0.9, top_p=0.95, seed=8)[0] and c != a


def test_stop_strings_cut_the_text(client, ref):
    p = ref["plain"][3]
    full = expected(ref, p, 40)[0]
    stop = full[12:15]
    cut = full[:full.index(stop)]
    assert len(cut) >= 5
    r = client.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.usage.completion_tokens < 40
    other = full[30:33]
    chunks = list(client.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0,
                                            stop=[other, stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:min(full.index(stop), full.index(other))]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_context_n_and_types_are_400(client, ref):
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 512 tokens; you requested 520 "
                                                     r"tokens \(500 in the prompt, 20 for the completion\)"):
        client.completions.create(model=MODEL, prompt=[5] * 500, max_tokens=20)
    with pytest.raises(openai.BadRequestError, match="'n' must be at most 16"):
        client.completions.create(model=MODEL, prompt="hi", n=17)
    with pytest.raises(openai.BadRequestError, match="'temperature' must be a number >= 0"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)


# ---- scoring and sampling options ------------------------------------------------------------------

def ref_logprobs(ref, ids):
    """log-softmax of the one-process model's logits over ids: row j scores ids[j + 1]."""
    im = ref["im"]
    logits = im.forward(np.array(ids), np.zeros(len(ids), np.int64), np.arange(len(ids)), im.new_cache(1, len(ids)))
    return np.stack([log_softmax(r) for r in logits])


def greedy_with(ref, ids, n, **sampling):
    """The one-process greedy loop with a Sampler's bias and penalties (tests/unit/test_sampling.py)."""
    im = ref["im"]
    cache = im.new_cache(1, len(ids) + n)
    s = Sampler(temperature=0, prompt=ids, **sampling)
    logits, out = im.prefill(cache, 0, ids), []
    for _ in range(n):
        t = s(logits)
        s.accept(t)
        out.append(t)
        if t in ref["eos"]:
            break
        logits = im.decode(cache, [0], [t])[0]
    return out


def test_completion_logprobs_and_echo_score_the_model(client, ref):
    """What lm-eval's local-completions model sends for log-likelihood: echo, logprobs, max_tokens 1."""
    tok = ref["tok"]
    p = ref["plain"][0]
    r = client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0, logprobs=3, echo=True)
    out = generate(ref["im"], p, 6, temperature=0, stop_ids=ref["eos"])
    full = p + out
    lp = ref_logprobs(ref, full)
    c = r.choices[0]
    assert c.text == tok.decode(p) + tok.decode(out)
    got = c.logprobs
    assert got.tokens == [tok.decode([i]) for i in full]
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    np.testing.assert_allclose(got.token_logprobs[1:], [lp[j - 1][full[j]] for j in range(1, len(full))],
                               rtol=0, atol=2e-4)
    for j in range(1, len(full)):
        want = np.sort(lp[j - 1])[::-1][:3]
        top = sorted(got.top_logprobs[j].values(), reverse=True)
        assert len(top) <= 3 and abs(top[0] - want[0]) < 2e-4
        if j >= len(p):       # greedy: the sampled token is the most likely (lm-eval's is_greedy)
            assert abs(got.token_logprobs[j] - top[0]) < 1e-9
    assert got.text_offset == list(np.cumsum([0] + [len(t) for t in got.tokens[:-1]]))
    # without echo: the sampled tokens only
    r = client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0, logprobs=0)
    assert r.choices[0].logprobs.tokens == [tok.decode([i]) for i in out]
    assert r.choices[0].logprobs.top_logprobs == [{}] * len(out)
    # the EOS that ends a request is scored (the last entry) but not shown
    e = ref["eos_prompt"]
    r = client.completions.create(model=MODEL, prompt=e, max_tokens=100, temperature=0, logprobs=0)
    out = generate(ref["im"], e, 100, temperature=0, stop_ids=ref["eos"])
    eos = tok.decode([ref["eos"][0]])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].logprobs.tokens == [tok.decode([i]) for i in out]
    assert r.choices[0].logprobs.tokens[-1] == eos and r.choices[0].text == tok.decode(out[:-1])


def test_chat_logprobs_streamed(client, ref, model_dir):
    msgs = [{"role": "user", "content": "Score me"}]
    ids = ref["tok"].encode(load_chat_template(model_dir).render(msgs))
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                  logprobs=True, top_logprobs=2, stream=True))
    entries = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    out = generate(ref["im"], ids, 8, temperature=0, stop_ids=ref["eos"])
    shown = [t for t in out if t not in ref["eos"]]
    lp = ref_logprobs(ref, ids + out)
    assert [e.token for e in entries] == [ref["tok"].decode([t]) for t in out]     # an EOS is scored, not shown
    np.testing.assert_allclose([e.logprob for e in entries], [lp[len(ids) - 1 + k][t] for k, t in enumerate(out)],
                               rtol=0, atol=2e-4)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)
    assert all(e.bytes == list(e.token.encode()) for e in entries)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref["tok"].decode(shown)


def test_n_list_prompts_bias_and_penalties(client, ref):
    tok = ref["tok"]
    p1, p2 = ref["plain"][1], ref["plain"][2]
    kw = dict(model=MODEL, max_tokens=8, temperature=0.9, top_p=0.95)
    r = client.completions.create(prompt=[p1, p2], n=2, seed=11, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:     # choice i * n + j: prompt i, seed + j
        i, j = divmod(c.index, 2)
        assert c.text == expected(ref, [p1, p2][i], 8, temperature=0.9, top_p=0.95, seed=11 + j)[0]
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.prompt_tokens == len(p1) + len(p2)
    # streamed: every chunk names its choice, each choice's text as above
    chunks = list(client.completions.create(prompt=p1, n=3, seed=5, stream=True, **kw))
    for j in range(3):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == j) == \
            expected(ref, p1, 8, temperature=0.9, top_p=0.95, seed=5 + j)[0]
    # logit_bias: +100 on one token makes greedy say it every time
    r = client.completions.create(model=MODEL, prompt=p1, max_tokens=5, temperature=0, logit_bias={"42": 100},
                                  logprobs=0)
    assert r.choices[0].logprobs.tokens == [tok.decode([42])] * 5
    # penalties: the one-process greedy loop with the same rules, and not plain greedy
    r = client.completions.create(model=MODEL, prompt=p1, max_tokens=24, temperature=0, presence_penalty=0.5,
                                  frequency_penalty=1.5)
    want = greedy_with(ref, p1, 24, presence_penalty=0.5, frequency_penalty=1.5)
    assert r.choices[0].text == tok.decode([t for t in want if t not in ref["eos"]])
    assert r.choices[0].text != expected(ref, p1, 24)[0]
    r = client.completions.create(model=MODEL, prompt=p1, max_tokens=24, temperature=0,
                                  extra_body={"repetition_penalty": 1.3, "min_p": 0.1})
    want = greedy_with(ref, p1, 24, repetition_penalty=1.3)
    assert r.choices[0].text == tok.decode([t for t in want if t not in ref["eos"]])


SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "ok": {"type": "boolean"}},
          "required": ["color", "n", "ok"], "additionalProperties": False}


def test_response_format_json_schema_validates(client, ref):
    """A random model, sampled: whatever it says, the grammar makes it valid for the schema."""
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
    for i in range(4):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Pick {i}"}],
                                           max_tokens=80, temperature=1.0, seed=i, response_format=fmt,
                                           logprobs=True)
        c = r.choices[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        assert all(np.isfinite(e.logprob) for e in c.logprobs.content)     # the model's scores, not the mask's
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick 0"}],
                                           max_tokens=80, temperature=1.0, seed=0)
    with pytest.raises(json.JSONDecodeError):      # the same request unconstrained is not JSON
        json.loads(plain.choices[0].message.content)
    status, r = raw(client_port(client), "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5,
                                                                              "maximum": 1}}}})
    assert status == 400 and r["error"]["param"] == "response_format", r
    status, r = raw(client_port(client), "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}})
    assert status == 400 and r["error"]["param"] == "response_format", r


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
              "type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}, "days": {"type": "integer",
                                                                                        "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "stop_timer", "parameters": {
             "type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"],
             "additionalProperties": False}}}]


def test_forced_tool_calls_match_their_schema(client):
    jsonschema = pytest.importorskip("jsonschema")
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    msgs = [{"role": "user", "content": "What is the weather?"}]
    names = set()
    for i in range(4):
        r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="required",
                                           max_tokens=60, temperature=1.0, seed=i)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        call = c.message.tool_calls[0]
        names.add(call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    assert names <= set(params)
    named = {"type": "function", "function": {"name": "stop_timer"}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=named,
                                                 max_tokens=60, stream=True))
    deltas = [ch.choices[0].delta.tool_calls for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.name == "stop_timer"
    jsonschema.validate(json.loads(deltas[0][0].function.arguments), params["stop_timer"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back in the conversation (content "": this ChatML template adds
    # content as a string; one that renders tool_calls takes null)
    follow = msgs + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "stop_timer", "arguments": '{"now": true}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "stopped"}]
    r = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.choices[0].message.content is not None and r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="auto"):
        client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=4)


def client_port(client) -> int:
    return client.base_url.port


def test_embeddings_are_the_mean_last_hidden_state(client, server, model_dir, ref):
    """/v1/embeddings against transformers' LlamaModel (last_hidden_state, after the final norm,
    averaged over the tokens) on the same weights; floats and base64 (what the openai client asks)."""
    import base64

    import torch
    from transformers import AutoModel
    texts = ["hello there", "the cat sat on the mat", "x"]
    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [hf(torch.tensor([ref["tok"].encode(t)])).last_hidden_state[0].mean(0).numpy() for t in texts]
    r = client.embeddings.create(model=MODEL, input=texts)
    got = np.stack([np.asarray(d.embedding, np.float32) for d in sorted(r.data, key=lambda d: d.index)])
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(ref["tok"].encode(t)) for t in texts)
    status, body = raw(server.port, "POST", "/v1/embeddings", {"input": texts[1], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    assert status == 200 and np.array_equal(vec, got[1])
    status, body = raw(server.port, "POST", "/v1/embeddings", {"input": [ref["tok"].encode(texts[0])]})
    assert status == 200 and np.allclose(body["data"][0]["embedding"], got[0], rtol=0, atol=1e-6)
    for bad, field in [({"input": ""}, "input"), ({"input": 5}, "input"), ({"input": "x", "dimensions": 8},
                                                                           "dimensions")]:
        status, body = raw(server.port, "POST", "/v1/embeddings", bad)
        assert status == 400 and body["error"]["param"] == field, body


@pytest.mark.slow      # lm-eval and a transformers model: ~25 s
def test_lm_eval_scores_through_the_server_what_it_scores_with_hf(server, model_dir, tmp_path, monkeypatch):
    """lm-eval's local-completions model (echo + logprobs over our HTTP) against its hf model (torch,
    transformers) on the same weights: a multiple-choice task from a local file, the same answers
    and log-likelihoods."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    rng = np.random.default_rng(7)
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
    with open(tmp_path / "mc.jsonl", "w") as f:
        for _ in range(12):
            q = " ".join(rng.choice(words, 6))
            f.write(json.dumps({"question": f"Which word comes next: {q}", "choices": list(rng.choice(words, 4)),
                                "answer": int(rng.integers(4))}) + "\n")
    (tmp_path / "cke_mc.yaml").write_text(f"""task: cke_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    tasks = TaskManager(include_path=str(tmp_path))
    runs = {}
    for name, args in [("local-completions", f"base_url=http://127.0.0.1:{server.port}/v1/completions,model={MODEL},"
                                             f"tokenizer={model_dir},max_length={CTX},num_concurrent=4,max_retries=1"),
                       ("hf", f"pretrained={model_dir},dtype=float32,device=cpu")]:
        runs[name] = lm_eval.simple_evaluate(model=name, model_args=args, tasks=["cke_mc"], task_manager=tasks,
                                             log_samples=True, batch_size=1)
    ours, hf = (runs[k]["samples"]["cke_mc"] for k in ("local-completions", "hf"))
    assert len(ours) == len(hf) == 12
    for a, b in zip(sorted(ours, key=lambda x: x["doc_id"]), sorted(hf, key=lambda x: x["doc_id"])):
        np.testing.assert_allclose([r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]], rtol=0, atol=1e-3)
        assert a["acc"] == b["acc"]
    assert runs["local-completions"]["results"]["cke_mc"]["acc,none"] == runs["hf"]["results"]["cke_mc"]["acc,none"]


# ---- raw HTTP: bad input, auth, disconnects --------------------------------------------------------

def test_bad_requests_name_the_field(server):
    port = server.port
    for body, field in [({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
                        ({"prompt": "hi", "temperature": -1}, "temperature"),
                        ({"prompt": "hi", "top_p": 2}, "top_p"),
                        ({"prompt": "hi", "stop": 5}, "stop"),
                        ({"prompt": "hi", "seed": "x"}, "seed"),
                        ({"prompt": "hi", "stream": "yes"}, "stream"),
                        ({"prompt": {"a": 1}}, "prompt"),
                        ({"prompt": ["a", 5]}, "prompt"),
                        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
                        ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
                        ({"prompt": "hi", "min_p": 1.5}, "min_p"),
                        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
                        ({"prompt": [1, 99999]}, None)]:       # a token id past the vocabulary
        status, r = raw(port, "POST", "/v1/completions", body)
        assert status == 400, (body, r)
        assert r["error"]["type"] == "invalid_request_error" and r["error"]["param"] == field, (body, r)
        if field:
            assert f"'{field}'" in r["error"]["message"], r
    status, r = raw(port, "POST", "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and r["error"]["param"] == "messages"
    status, r = raw(port, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in r["error"]["message"]
    status, r = raw(port, "POST", "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in r["error"]["message"]
    status, r = raw(port, "POST", "/v1/completions", {"prompt": [3, 4], "max_tokens": 2, "temperature": 0,
                                                      "frobnicate": {"x": 1}})   # unknown fields: ignored
    assert status == 200 and r["usage"]["completion_tokens"] == 2
    assert raw(port, "GET", "/v1/nothing")[0] == 404
    assert raw(port, "GET", "/v1/completions")[0] == 405
    assert raw(port, "DELETE", "/health")[0] == 405
    # the limit is checked on Content-Length, before a byte of the body is read
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
              f"Content-Length: {2 << 20}\r\n\r\n".encode())
    head = s.recv(4096)
    s.close()
    assert head.startswith(b"HTTP/1.1 413"), head


def test_what_openai_refuses_is_refused(server, client):
    """Each of these was a 200 or a 500 once: a lone surrogate, an unknown model, a made-up role,
    top_k -5, content null."""
    port = server.port
    chat = "/v1/chat/completions"
    for path, body, status, field, words in [
        ("/v1/completions", {"prompt": "Hi \ud800 there"}, 400, "prompt", "lone surrogate U+D800 at character 3"),
        (chat, {"messages": [{"role": "user", "content": "a\udfffb"}]}, 400, "messages", "lone surrogate U+DFFF"),
        ("/v1/completions", {"prompt": "hi", "stop": ["\ud83d"]}, 400, "stop", "lone surrogate"),
        (chat, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", 'role is "wizard"'),
        (chat, {"messages": [{"role": "user", "content": None}]}, 400, "messages", "content must be a string"),
        (chat, {"messages": [{"role": "user"}]}, 400, "messages", "content must be a string"),
        ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k", "0 or -1 for no limit"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "model", "'gpt-4o' does not exist"),
    ]:
        got, r = raw(port, "POST", path, body)
        assert got == status and r["error"]["param"] == field and words in r["error"]["message"], (body, got, r)
    assert raw(port, "POST", "/v1/completions", {"prompt": "hi", "model": "gpt-4o"})[1]["error"]["code"] == \
        "model_not_found"
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny-chat'"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=1)
    # what stays accepted: no model named, a pair of surrogates (one character), top_k -1, every role
    pair = {"prompt": "Hi \ud83d\ude00", "max_tokens": 1, "top_k": -1}
    assert raw(port, "POST", "/v1/completions", pair)[0] == 200
    msgs = [{"role": r, "content": "x"} for r in ("system", "developer", "user", "assistant", "user")]
    assert raw(port, "POST", chat, {"model": MODEL, "messages": msgs, "max_tokens": 1})[0] == 200


def test_system_fingerprint(server, client):
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    chunks = list(client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True))
    fps = {r.system_fingerprint, c.system_fingerprint, *(ch.system_fingerprint for ch in chunks)}
    assert len(fps) == 1 and re.fullmatch(r"fp_[0-9a-f]{12}", fps.pop()), fps


def scrape(port) -> dict:
    """/metrics parsed by prometheus_client's parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")       # no key: Prometheus scrapes it as /health is probed
    r = conn.getresponse()
    text = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain"), (r.status, text[:300])
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def test_metrics_count_what_was_served(server, client, ref):
    before = scrape(server.port)
    client.completions.create(model=MODEL, prompt=ref["plain"][3], max_tokens=5, temperature=0, extra_body={
        "ignore_eos": True})
    raw(server.port, "POST", "/v1/completions", {"prompt": "hi", "top_p": 7})      # a 400
    after = scrape(server.port)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert delta("cke_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("cke_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("cke_generation_tokens_total") == 5
    assert delta("cke_prompt_tokens_total") == len(ref["plain"][3])
    assert delta("cke_time_to_first_token_seconds_count") == 1
    assert delta("cke_request_duration_seconds_count", endpoint="/v1/completions") == 2
    assert after[("cke_kv_cache_tokens", (("state", "capacity"),))] == 8 * CTX
    assert after[("cke_requests_running", ())] == 0 and after[("cke_requests_waiting", ())] == 0


def test_tokenize_and_detokenize(server, ref, model_dir):
    tok = ref["tok"]
    status, r = raw(server.port, "POST", "/tokenize", {"prompt": "hello there"})
    assert status == 200 and r["tokens"] == tok.encode("hello there") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CTX
    msgs = [{"role": "user", "content": "hi"}]
    status, r = raw(server.port, "POST", "/tokenize", {"messages": msgs})
    assert status == 200 and r["tokens"] == tok.encode(load_chat_template(model_dir).render(msgs))
    status, r = raw(server.port, "POST", "/detokenize", {"tokens": tok.encode("hello there")})
    assert status == 200 and r == {"prompt": "hello there"}
    status, r = raw(server.port, "POST", "/detokenize", {"tokens": [1, 10 ** 6]})
    assert status == 400 and r["error"]["param"] == "tokens"
    assert raw(server.port, "POST", "/tokenize", {"prompt": "x"}, key=None)[0] == 401


def test_api_key(server):
    port = server.port
    assert raw(port, "GET", "/health", key=None) == (200, {"status": "ok"})
    status, r = raw(port, "GET", "/v1/models", key=None)
    assert status == 401 and r["error"]["code"] == "invalid_api_key"
    assert raw(port, "POST", "/v1/completions", {"prompt": "hi"}, key="wrong")[0] == 401
    status, r = raw(port, "GET", "/v1/models")
    assert status == 200 and r["data"][0]["id"] == "tiny-chat" and r["data"][0]["max_model_len"] == CTX


def test_a_client_leaving_mid_stream_is_cancelled(server, client, ref):
    p = ref["plain"][4]
    s = open_stream(server.port, {"prompt": p, "max_tokens": LONG, "temperature": 0})
    got = read_events(s, 3)
    assert got.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in got
    s.close()
    # the others go on being served; the engine is not stuck on the abandoned request
    q = ref["plain"][5]
    r = client.completions.create(model=MODEL, prompt=q, max_tokens=10, temperature=0)
    assert r.choices[0].text == expected(ref, q, 10)[0]
    deadline = time.monotonic() + 10
    pat = re.compile(r"client went away: its request was cancelled after (\d+) tokens")
    while not pat.search(server.output()) and time.monotonic() < deadline:
        time.sleep(0.1)
    m = pat.search(server.output())
    assert m and int(m.group(1)) < LONG, server.output()[-3000:]


def test_no_chat_template_is_400_and_the_banner(tmp_path, ref):
    d = tmp_path / "plain"
    make_model_dir(d, template=None)
    s = ServerProc(d, "--max-batch", "2", "--threads", "1", "--api-key", "sekrit")
    try:
        out = s.output()
        assert "layout tp=1 x pp=1" in out and "model 'plain'" in out and "try: curl http://127.0.0.1:" in out
        # the banner's curl names where the key came from, never the key (and no variable nobody set)
        assert 'Bearer <the --api-key value>"' in out and "sekrit" not in out and "CKE_API_KEY" not in out, out
        status, r = raw(s.port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
                        key="sekrit")
        assert status == 400 and "has no chat template" in r["error"]["message"]
        assert raw(s.port, "POST", "/v1/completions", {"prompt": [3], "max_tokens": 1}, key="sekrit")[0] == 200
    finally:
        s.kill()


def test_command_errors_are_one_line_once(model_dir, tmp_path):
    """Bad arguments end with one line naming what to change, not a traceback per rank."""
    missing = tmp_path / "nowhere" / "model.gguf"
    cases = [
        (["serve", "--model", str(missing)], 1, f"cke-dist serve: error: model {missing} does not exist"),
        (["generate", "--model", str(missing), "--prompt", "hi", "--tp", "2"], 2, "does not exist: give a model "
                                                                                  "directory"),
        (["serve", "--model", str(model_dir), "--port", "70000"], 1, "argument --port: 70000 is out of range"),
        (["serve", "--model", str(model_dir), "--max-len", "100000"], 1,
         f"--max-len 100000: the model's context is {CTX} tokens"),
        (["generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "0"], 1,
         "argument --max-new-tokens: 0 is out of range"),
        (["generate", "--model", str(model_dir / "config.json"), "--prompt", "hi"], 1,
         "is a file but not a GGUF file"),
    ]
    for args, n, words in cases:
        cmd = [sys.executable, "-m", "cke_dist.cli", *args]
        if n > 1:
            cmd = [mpiexec(), "-n", str(n), *cmd]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        errors = [line for line in (p.stdout + p.stderr).splitlines() if "error" in line.lower()]
        assert p.returncode == 2 and len(errors) == 1 and words in errors[0], (args, p.returncode, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr


def test_quantize_keeps_the_chat_template(model_dir, tmp_path, ref):
    src = tmp_path / "with-jinja"
    shutil.copytree(model_dir, src)
    (src / "chat_template.jinja").write_text(MULTILINE_TEMPLATE)
    out = tmp_path / "q8"
    p = subprocess.run([sys.executable, "-m", "cke_dist.cli", "quantize", "--model", str(src), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    msgs = [{"role": "user", "content": "hi"}]
    assert load_chat_template(out).render(msgs) == load_chat_template(src).render(msgs)


# ---- tp=2 under mpiexec ------------------------------------------------------------------------------

def test_tp2_serves_like_one_process_and_a_killed_rank_ends_the_job(model_dir, ref):
    s = ServerProc(model_dir, "--tp", "2", n=2, marker=f"tp2-{os.getpid()}")
    try:
        assert "layout tp=2 x pp=1 on 2 ranks" in s.output()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0, timeout=60)
        prompts = ref["plain"][:3]
        outs = [None] * 3

        def one(i):
            outs[i] = "".join(ch.choices[0].text for ch in c.completions.create(
                model=MODEL, prompt=prompts[i], max_tokens=24, temperature=0, stream=True))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outs == [expected(ref, p, 24)[0] for p in prompts]
        msgs = [{"role": "user", "content": "hi"}]
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
        ids = ref["tok"].encode(load_chat_template(model_dir).render(msgs))
        assert r.choices[0].message.content == expected(ref, ids, 12)[0]
        assert scrape(s.port)[("cke_comm_seconds_total", (("group", "tp"),))] > 0

        # rank 1 dies mid-request: MPICH's mpiexec ends the whole job; the client is not left hanging
        sock = open_stream(s.port, {"prompt": ref["plain"][4], "max_tokens": LONG, "temperature": 0})
        got = read_events(sock, 2)
        t0 = time.monotonic()
        os.kill(s.rank_pid(1), signal.SIGKILL)
        got += read_to_end(sock, 20)
        assert b"[DONE]" not in got
        rc = s.wait(20 - (time.monotonic() - t0))
        assert rc is not None and rc != 0, f"mpiexec: {rc}\n{s.output()[-3000:]}"
    finally:
        s.kill()


def test_a_dead_rank_is_503_then_a_nonzero_exit(model_dir, ref):
    """-disable-auto-cleanup and ranks under sh: mpiexec leaves rank 0 running, so what answers is our
    own failure path."""
    s = ServerProc(model_dir, "--tp", "2", n=2, mpi_flags=("-disable-auto-cleanup",), marker=f"dead-{os.getpid()}",
                   under_sh=True)
    try:
        inflight = {}

        def whole():
            inflight["r"] = raw(s.port, "POST", "/v1/completions",
                                {"prompt": ref["plain"][0], "max_tokens": LONG, "temperature": 0}, key=None)

        t = threading.Thread(target=whole)
        t.start()
        sock = open_stream(s.port, {"prompt": ref["plain"][1], "max_tokens": LONG, "temperature": 0})
        got = read_events(sock, 2)
        assert t.is_alive(), "the long request finished before the kill: make it longer"
        t0 = time.monotonic()
        os.kill(s.rank_pid(1), signal.SIGKILL)
        t.join(20)
        status, r = inflight["r"]
        assert status == 503 and r["error"]["type"] == "server_error", r
        got += read_to_end(sock, 10)
        assert b"[DONE]" not in got and b'"code": 503' in got, (got[-600:], s.output()[-3000:])
        status, r = raw(s.port, "POST", "/v1/completions", {"prompt": [1, 2]}, key=None)
        assert status == 503, r
        assert raw(s.port, "GET", "/health", key=None)[0] == 503
        rc = s.wait(20 - (time.monotonic() - t0))
        assert rc is not None and rc != 0, f"mpiexec: {rc}\n{s.output()[-3000:]}"
        assert "answering 503 and ending the job" in s.output()
    finally:
        s.kill()
