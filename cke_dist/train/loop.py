"""The training job (`cke-dist train`, cke_dist/cli/train.py, is its command line).

One optimizer step, top to bottom (see `train`):
  lr from the warmup+cosine schedule (a function of the step),
  K micro-batches: forward_backward with grad_scale = 1/K adds into the flat grad buffer,
  clip the global grad norm, optimizer step,
  rank 0: progress bar (loss, tokens/s) and a JSON line in <out_dir>/metrics.jsonl,
  every eval_every steps the mean loss over fixed validation batches,
  every checkpoint_every steps (and at the end) an atomic checkpoint (cke_dist.formats.checkpoint).

Rules this module keeps:
- Batches depend only on (seed, step) (cke_dist.train.data), and the schedule only on the step, so
  `--resume` restores the model, the optimizer state and the step and reproduces an
  uninterrupted run exactly (tests/integration/test_train_job.py checks it bitwise).
- Under mpiexec the world is a dp x pp x tp grid (`[parallel] tp, pp`, dp = world size / (tp*pp);
  tp ranks adjacent): a replica holds one model cut into pipeline stages and tp shards
  (cke_dist.model.layout), all its ranks seeing the same rows; each dp replica takes
  `rows_for_rank` of every micro-batch; `train_step` runs the micro-batches (through the
  pipeline schedule when pp > 1), averages the gradients over dp (bucketed, overlapped with
  backward), sums what model-parallel ranks share and clips by the global norm; the logged loss
  and the validation loss are the last stage's, dp-averaged; replicas are checked identical at
  every checkpoint; the ranks of dp replica 0 each write their own slices into one checkpoint
  that loads on any layout (cke_dist.formats.checkpoint). Without mpiexec the world is one process and the same
  code runs.
- Every bad input (config key, corpus, checkpoint) ends the job with one message naming the file
  or key, exit status 2.
"""
import hashlib
import json
import resource
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import cke_kernels
from cke_kernels.threads import set_num_threads

from cke_dist.comm import init
from cke_dist.formats.checkpoint import CheckpointError, Shard, find_checkpoint, load_checkpoint, save_checkpoint
from cke_dist.formats.hf import HFFormatError, open_hf_tensors
from cke_dist.formats.gguf import is_gguf
from cke_dist.formats.tokenizer import BYTES_FILE, HF_FILE, ByteTokenizer, load_tokenizer, tokenizer_files
from cke_dist.model import LlamaConfig, Model, load_model, param_specs
from cke_dist.model.load import read_model_config
from cke_dist.model.lora import (ADAPTER_CONFIG, ADAPTER_STEM, LoraModel, LoraSettings, lora_specs,
                                 read_adapter_config)
from cke_dist.parallel.data_parallel import GradBuckets, check_params_in_sync, sync_params
from cke_dist.parallel.grid import ProcessGrid
from cke_dist.parallel.pipeline import grid_stage, pipeline_loss
from cke_dist.parallel.step import ParallelGrads, train_step
from cke_dist.parallel.zero import Zero1
from cke_dist.serving.chat import load_chat_template
from cke_dist.serving.generate import generate
from cke_dist.train.config import ConfigError, TrainConfig, load_config
from cke_dist.train.chat_data import IGNORE, ChatSampler, open_chat
from cke_dist.train.data import DOCUMENTS, TRAIN, VAL, BatchSampler, DataError, micro_batch_rows, open_corpus
from cke_dist.train.optim import SGD, AdamW
from cke_dist.train.schedule import lr_at

REPO_ROOT = Path(__file__).resolve().parents[2]  # the repo is installed editable: examples/ lives here


def resolve_config(config_path, overrides, resume_path) -> tuple[TrainConfig, Path | None]:
    """The config to run: defaults <- TOML <- --set; on --resume the checkpoint's config is the base."""
    if resume_path is None:
        return load_config(config_path, overrides), None
    ckpt = find_checkpoint(resume_path)
    state_path = ckpt / "trainer_state.json"
    try:
        saved = TrainConfig.from_dict(json.loads(state_path.read_text())["config"], str(state_path))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{state_path}: cannot read the saved training config ({type(e).__name__}: {e})") \
            from None
    cfg = load_config(config_path, overrides, base=saved)
    if cfg.model != saved.model:
        diff = [f"model.{k}: checkpoint {v!r}, now {getattr(cfg.model, k)!r}"
                for k, v in vars(saved.model).items() if getattr(cfg.model, k) != v]
        raise ConfigError(f"--resume {resume_path}: the model section differs from the checkpoint's ("
                          + "; ".join(diff) + "); a resumed run keeps the checkpoint's model")
    return cfg, ckpt


def resolve_data_path(path: str) -> Path:
    """Relative corpus paths are looked up in the current directory, then in the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    if (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    raise FileNotFoundError(f"data.path {path!r}: not found in {Path.cwd()} nor in {REPO_ROOT}")


def _run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def model_config(cfg: TrainConfig, ckpt_dir: Path | None = None):
    """The LlamaConfig the job trains: the checkpoint's, model.init_from's, or the [model] section's."""
    src = ckpt_dir or (Path(cfg.model.init_from) if cfg.model.init_from else None)
    if src is not None:
        try:
            return LlamaConfig.from_dict(read_model_config(src))     # an HF directory, checkpoint or GGUF
        except (ValueError, FileNotFoundError) as e:
            raise HFFormatError(f"model.init_from {cfg.model.init_from!r}: {e}" if ckpt_dir is None else str(e)) from e
    try:
        return LlamaConfig.from_dict(cfg.model.hf_config())
    except ValueError as e:  # LlamaConfig names the key; say where it came from
        raise ConfigError(f"[model] section: {e}") from e


def model_tokenizer(cfg: TrainConfig, ckpt_dir: Path | None = None) -> tuple[object, dict[str, bytes]]:
    """(the tokenizer text data is read with, {file: content} every checkpoint carries): the
    checkpoint's or model.init_from's own (an HF directory or a GGUF file), or bytes for a model of
    ours started from the [model] section. None when the source has no tokenizer at all."""
    src = ckpt_dir or (cfg.model.init_from or None)
    if src is None:
        return ByteTokenizer(), {BYTES_FILE: b'{"type": "bytes"}\n'}
    files = tokenizer_files(src)
    if HF_FILE in files or BYTES_FILE in files or is_gguf(src):
        return load_tokenizer(src), files
    return None, files


def build_model(cfg: TrainConfig, grid, ckpt_dir: Path | None = None):
    """This rank's part of the model (its tp shard of its pipeline stage): from the checkpoint, from
    model.init_from (each reading only its slices) or a fresh init from the seed."""
    llama = model_config(cfg, ckpt_dir)
    try:
        stage = grid_stage(grid, llama, cfg.parallel.pp_layers)
    except ValueError as e:
        raise ConfigError(f"parallel.pp = {cfg.parallel.pp}: {e}") from e
    src = ckpt_dir or (cfg.model.init_from or None)
    try:
        if cfg.lora.rank:
            return build_lora(cfg, grid, stage, ckpt_dir)
        if src is not None:
            return load_model(src, tp_group=grid.tp_group, stage=stage)
        return Model.from_config(llama, seed=cfg.train.seed, tp_group=grid.tp_group, stage=stage)
    except ValueError as e:   # e.g. a tp that does not fit a checkpoint's heads
        if ckpt_dir is not None:
            raise CheckpointError(f"{ckpt_dir}: {e}") from e
        raise ConfigError(f"parallel.tp = {cfg.parallel.tp}: {e}") from e


def lora_settings(cfg: TrainConfig) -> LoraSettings:
    return LoraSettings(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, LoraSettings.parse_targets(cfg.lora.targets))


def build_lora(cfg: TrainConfig, grid, stage, ckpt_dir: Path | None) -> LoraModel:
    """Adapters on the frozen model.init_from: fresh (PEFT's init from the seed) or the checkpoint's."""
    settings = lora_settings(cfg)
    base = load_model(cfg.model.init_from, tp_group=grid.tp_group, stage=stage)
    model = LoraModel(base, settings, seed=cfg.train.seed)
    if cfg.lora.quantize_base:
        base.quantize_frozen(cfg.lora.quantize_base)
    if ckpt_dir is not None:
        if not (ckpt_dir / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{ckpt_dir}: a full fine-tune's checkpoint, not LoRA adapters; resume it "
                                  f"with --set lora.rank=0")
        saved = read_adapter_config(ckpt_dir)
        if (saved.rank, saved.targets) != (settings.rank, settings.targets):
            raise CheckpointError(f"{ckpt_dir}: adapters of rank {saved.rank} on {','.join(saved.targets)}; "
                                  f"this run asks rank {settings.rank} on {','.join(settings.targets)}")
        model.load_adapter(open_hf_tensors(ckpt_dir), ckpt_dir)
    return model


def build_optimizer(cfg: TrainConfig, model):
    o = cfg.optim
    if o.name == "adamw":
        return AdamW(model, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    return SGD(model, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def open_data(cfg: TrainConfig, data_path: Path, tokenizer, vocab_size: int, ckpt_dir: Path | None, progress: bool):
    """(train sampler, validation sampler, {"format", "unit", "train", "val"}) of the [data] section."""
    seq_len, seed = cfg.data.seq_len, cfg.train.seed
    rows = cfg.data.batch_size * cfg.data.grad_accum
    val_path = resolve_data_path(cfg.data.val_path) if cfg.data.val_path else None
    # an error about the validation split names it, not the whole file the user knows to be larger
    val_label = val_path or (f"{data_path}'s validation split (its last data.val_fraction = "
                             f"{cfg.data.val_fraction:g}; raise it or give data.val_path)")
    if cfg.data.format == "chat":
        if not hasattr(tokenizer, "encode_with_offsets"):
            raise DataError("data.format = \"chat\" needs a model with its own tokenizer and chat template "
                            "(model.init_from an HF directory or a GGUF file)")
        src = ckpt_dir or cfg.model.init_from
        train_rows, val_rows = open_chat(data_path, load_chat_template(src), tokenizer, seq_len,
                                         cfg.data.val_fraction, val_path, pack=cfg.data.pack)
        if train_rows.truncated and progress:
            print(f"cke-dist train: {train_rows.truncated} conversation(s) longer than data.seq_len + 1 = "
                  f"{seq_len + 1} tokens are cut", file=sys.stderr)
        return (ChatSampler(train_rows, rows, seed, TRAIN, data_path),
                ChatSampler(val_rows, cfg.data.batch_size, seed, VAL, val_label),
                {"format": "chat", "unit": "conversations", "train": train_rows.conversations,
                 "val": val_rows.conversations})
    eos = None
    if cfg.data.pack:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise DataError(f"data.pack = true splits text at the end-of-text token, but "
                            f"{cfg.model.init_from or 'this model'}'s tokenizer has none; set data.pack = false")
    corpus = open_corpus(data_path, cfg.data.format, cfg.data.val_fraction, seq_len, vocab_size, tokenizer,
                         val_path, progress=progress)
    return (BatchSampler(corpus.train, rows, seq_len, seed, TRAIN, data_path, eos_id=eos),
            BatchSampler(corpus.val, cfg.data.batch_size, seq_len, seed, VAL, val_label, eos_id=eos),
            {"format": corpus.format, "unit": "tokens", "train": int(len(corpus.train)), "val": int(len(corpus.val))})


def token_scales(sampler, step: int, micro_rows: int, accum: int, dp_rank: int, dp_size: int) -> list[float]:
    """Each of this rank's micro-batches weighted by its share of the step's valid targets (see
    parallel.step.train_step), so the step's loss is the mean over every assistant token of the
    global batch whatever the layout."""
    targets = sampler.batch(step)[1]
    valid = (targets != IGNORE).sum(axis=1)
    total = int(valid.sum())
    mine = [int(valid[micro_batch_rows(m, micro_rows, dp_rank, dp_size)].sum()) for m in range(accum)]
    return [dp_size * n / total if total else 0.0 for n in mine]


class StopSignal:
    """SIGTERM (Slurm's preemption notice, a scheduler's stop) ends the job after the step in flight,
    with a checkpoint, instead of killing it: the handler only sets a flag, and every rank takes the
    flag of any rank (one tiny allreduce a step) so all stop after the same step."""

    def __init__(self):
        self.name, self.flag = None, np.zeros(1, np.int64)
        self._old = signal.signal(signal.SIGTERM, self._handle) \
            if threading.current_thread() is threading.main_thread() else None

    def _handle(self, signum, frame):
        self.name, self.flag[0] = signal.Signals(signum).name, 1

    def agreed(self, world) -> bool:
        flag = self.flag.copy()
        if world.size > 1:
            world.allreduce(flag, op="max")
        if flag[0] and self.name is None:
            self.name = "SIGTERM"      # another rank's
        return bool(flag[0])

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def evaluate(model, inputs: np.ndarray, targets: np.ndarray, grid, chunk: int, positions=None) -> float:
    """The mean loss over every valid target of the fixed validation set, the same number in every
    layout: each dp rank scores its block of rows (through the pipeline when pp > 1) in chunks of
    `chunk` rows, and the sums of the losses and of the targets are added over dp. positions: the
    packed rows' (data.pack), or None."""
    rows = np.array_split(np.arange(len(inputs)), grid.dp)[grid.dp_rank]
    acc = np.zeros(2, np.float64)
    for i in range(0, len(rows), chunk):
        x, y = inputs[rows[i:i + chunk]], targets[rows[i:i + chunk]]
        pos = None if positions is None else positions[rows[i:i + chunk]]
        n = int((y != IGNORE).sum())
        mean = pipeline_loss(model, grid, x, y, positions=pos) if grid.shape.pp > 1 \
            else model.loss(x, y, positions=pos)
        acc += (mean * n, n)
    if grid.dp > 1:
        grid.dp_group.allreduce(acc, op="sum")
    return float(acc[0] / acc[1]) if acc[1] else float("nan")


def job_digest(cfg: TrainConfig, resume: Path | None) -> bytes:
    """sha256 of what every rank must agree on: the resolved config (out_dir aside: its default is
    each rank's clock), the resume path, and the code (cke_dist and cke_kernels sources)."""
    h = hashlib.sha256()
    d = cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k != "out_dir"}
    h.update(json.dumps({"config": d, "resume": str(resume)}, sort_keys=True).encode())
    for root in (Path(__file__).parents[1], Path(cke_kernels.__file__).parent):
        for f in sorted(root.rglob("*.py")):
            h.update(f.read_bytes())
    return h.digest()


def check_same_job(world, cfg: TrainConfig, resume: Path | None) -> None:
    """Every rank runs the same config and code, or every rank stops with the ranks that differ named
    (before anything else is communicated, so a mismatch is an error, not a hang in a collective)."""
    if world.size == 1:
        return
    mine = np.frombuffer(job_digest(cfg, resume), np.int64)
    every = np.zeros(world.size * mine.size, np.int64)
    world.allgather(mine, every)
    every = every.reshape(world.size, -1)
    bad = [r for r in range(world.size) if (every[r] != every[0]).any()]
    if bad:
        raise ConfigError(f"rank(s) {', '.join(map(str, bad))} run another config or code version than rank 0 "
                          f"(a digest of the resolved config, --resume and the cke_dist sources differs); launch "
                          f"every rank with the same arguments and installation")


def make_grid(world, cfg: TrainConfig, resumed: bool = False):
    """The dp x pp x tp grid of the config over this world, or a ConfigError that every rank raises
    alike (nothing has been communicated yet, so no rank waits for another)."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world.size % (tp * pp):
        fits = [t for t in range(1, world.size + 1) if world.size % (t * pp) == 0]
        raise ConfigError(f"parallel.tp = {tp} x parallel.pp = {pp} does not divide the world of {world.size} "
                          f"rank(s): launch with mpiexec -n {tp * pp} (or a multiple), or set parallel.tp to "
                          f"one of {fits}" + ("; a resumed run keeps the checkpoint's [parallel] section "
                                              "unless --set parallel.tp=T --set parallel.pp=P changes it "
                                              "(any layout loads any checkpoint)" if resumed else ""))
    return ProcessGrid(world, pp=pp, tp=tp)


def describe_transports(grid) -> str:
    """'dp over shm, tp over shm' style: which transports carry each group's traffic."""
    parts = []
    for axis, group in (("dp", grid.dp_group), ("pp", grid.pp_group), ("tp", grid.tp_group)):
        if group.size > 1:
            kinds = sorted({link.kind for link in group.links.values()})
            parts.append(f"{axis} over {'+'.join(kinds)}")
    return ", ".join(parts) or "one process"


def _default_out_dir() -> Path:
    return Path("runs") / datetime.now(timezone.utc).strftime("train-%Y%m%d-%H%M%S")


def train(cfg: TrainConfig, resume: Path | None = None, progress: bool = True) -> dict:
    """Run the job; returns {"model", "out_dir", "checkpoint", "step", "loss", "val_loss", "sample"}."""
    world = init()  # under mpiexec: every rank; one plain process: a size-1 world
    check_same_job(world, cfg, resume)
    grid = make_grid(world, cfg, resumed=resume is not None)
    dp_rank, dp_size = grid.dp_rank, grid.dp
    is_rank0 = grid.world.rank == 0
    writer_group = grid.dp_rank == 0   # the replica that writes checkpoints (and, pp = 1, generates the sample)

    if cfg.train.threads:
        set_num_threads(cfg.train.threads)

    ckpt = load_checkpoint(resume) if resume is not None else None
    model = build_model(cfg, grid, ckpt.path if ckpt is not None else None)
    getattr(model, "base", model).recompute = cfg.train.recompute   # a LoraModel's frozen base runs the layers
    if ckpt is not None:
        start_step = int(ckpt.trainer_state["step"])
        saved_out = ckpt.trainer_state["config"]["train"]["out_dir"]
        # a resumed run continues in the run directory it came from unless told otherwise
        out_dir = Path(cfg.train.out_dir) if cfg.train.out_dir != saved_out else _run_dir_of(ckpt.path)
    else:
        start_step = 0
        out_dir = Path(cfg.train.out_dir) if cfg.train.out_dir else _default_out_dir()
    cfg.train.out_dir = str(out_dir)
    sync_params(model, grid)  # rank 0's parameters everywhere (a checksum check names any rank that differs)

    if cfg.data.seq_len > model.config.max_position_embeddings:
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                          f"({model.config.max_position_embeddings})")
    data_path = resolve_data_path(cfg.data.path)
    tokenizer, tok_files = model_tokenizer(cfg, ckpt.path if ckpt is not None else None)
    train_batches, val_batches, data_info = open_data(cfg, data_path, tokenizer, model.config.vocab_size,
                                                      ckpt.path if ckpt is not None else None,
                                                      progress and is_rank0)
    if ckpt is None and not cfg.model.init_from and data_info["format"] not in DOCUMENTS:
        tokenizer, tok_files = None, {}   # ids from a token file are not bytes: no tokenizer to carry
    micro_rows, accum, seq_len = cfg.data.batch_size, cfg.data.grad_accum, cfg.data.seq_len

    # ZeRO-1: the optimizer sees only this dp rank's slice of the flat buffers
    zero = Zero1(model, grid.dp_group) if cfg.parallel.zero else None
    optimizer = build_optimizer(cfg, zero.shard if zero else model)
    if ckpt is not None:
        # this rank's slices of the moments, whatever layout saved them
        state = ckpt.optimizer_state(model.specs, optimizer.state_names())
        try:
            optimizer.load_state_dict(zero.shard_state(state) if zero else state)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: its optimizer state does not fit optim.name = "
                                  f"{cfg.optim.name!r} and this model: {e}") from e
    buckets = GradBuckets(model.grads, None if zero else grid.dp_group, bucket_mb=cfg.train.bucket_mb)
    shared_grads = ParallelGrads(model, grid)

    steps = cfg.train.steps
    tokens_per_step = micro_rows * accum * seq_len
    metrics_path = out_dir / "metrics.jsonl"
    if is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_params = sum(s.size for s in param_specs(model.config))
        if cfg.lora.rank:
            n_lora = sum(s.size for s in lora_specs(model.config, model.settings))
            print(f"cke-dist train: LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: {n_lora / 1e6:.3f}M "
                  f"trainable of {n_params / 1e6:.2f}M, the base frozen", file=sys.stderr)
        print(f"cke-dist train: grid dp={grid.dp} x pp={grid.shape.pp} x tp={grid.shape.tp} "
              f"({describe_transports(grid)})", file=sys.stderr)
        print(f"cke-dist train: {n_params / 1e6:.2f}M parameters, {data_info['train']:,} train / "
              f"{data_info['val']:,} val {data_info['unit']} from {data_path}, {tokens_per_step:,} tokens/step, "
              f"steps {start_step}..{steps}, out_dir {out_dir}", file=sys.stderr)

    if is_rank0 and metrics_path.exists():
        # a resumed run drops what the interrupted one logged past its checkpoint: a plot then never
        # draws a line back in time
        kept = [line for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(record: dict) -> None:
        if is_rank0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    val_inputs, val_targets, *val_positions = val_batches.fixed_set(cfg.train.eval_tokens)
    # a LoRA checkpoint is a PEFT adapter directory: its config names the base by absolute path
    adapter_files = {ADAPTER_CONFIG: (json.dumps(model.settings.peft_config(
        str(Path(cfg.model.init_from).resolve())), indent=2) + "\n").encode()} if cfg.lora.rank else {}

    def validate(step: int) -> float:
        v = evaluate(model, val_inputs, val_targets, grid, micro_rows, *val_positions)
        log({"step": step, "val_loss": v, "time": time.time()})
        return v

    def checkpoint(step: int, root: Path | None = None, keep: int | None = None) -> Path:
        """Collective over the world: dp replica 0's ranks write their slices at once."""
        opt_state = zero.full_state(optimizer) if zero else optimizer.state_dict()   # zero: collective over dp
        shard = None
        if writer_group:
            shard = Shard(grid.pp_rank * grid.shape.tp + grid.tp_rank, grid.shape.pp * grid.shape.tp,
                          model.specs, model.params, opt_state, stem=ADAPTER_STEM if cfg.lora.rank else "model")
        state = {
            "config": cfg.to_dict(),
            # batches are a function of (seed, split, step): the data position is the step itself
            "data": {"path": str(data_path), "format": data_info["format"], "seed": cfg.train.seed,
                     "next_step": step, "rng": "np.random.default_rng([seed, split, step])",
                     f"train_{data_info['unit']}": data_info["train"], f"val_{data_info['unit']}": data_info["val"]},
            "optimizer": {k: v for k, v in opt_state.items() if not isinstance(v, np.ndarray)},
            "tokens_seen": step * tokens_per_step,
            "world_size": grid.world.size,
            "grid": {"dp": grid.dp, "pp": grid.shape.pp, "tp": grid.shape.tp},
        }
        # the barriers inside wait under train.checkpoint_timeout: a write may take longer than the
        # comm deadline without the waiting ranks timing out
        return save_checkpoint(root or out_dir / "checkpoints", step, model.config, shard, state,
                               dict(tok_files, **adapter_files),
                               keep=keep or cfg.train.keep_checkpoints, world=world,
                               timeout=cfg.train.checkpoint_timeout)

    bar = None
    if is_rank0 and progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    loss = val_loss = float("nan")
    best = float("inf")
    last_ckpt = None
    if start_step == 0 and cfg.train.eval_every and start_step < steps:
        val_loss = validate(0)       # the baseline every curve starts from
    stop = StopSignal()
    window_time, window_tokens = 0.0, 0  # training time only: eval and checkpoints are not throughput
    try:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, steps)
            if isinstance(model, LoraModel):
                model.step = step     # its dropout masks follow the step
            micro_batches = [train_batches.micro_batch(step, micro, micro_rows, dp_rank, dp_size)
                             for micro in range(accum)]
            scales = token_scales(train_batches, step, micro_rows, accum, dp_rank, dp_size) \
                if isinstance(train_batches, ChatSampler) else None
            try:
                loss, grad_norm = train_step(model, optimizer, grid, micro_batches, lr, cfg.optim.grad_clip, buckets,
                                             shared_grads, cfg.parallel.schedule, zero=zero,
                                             scales=scales)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} at step {step}; lower optim.lr or raise optim.warmup_steps") from None
            done = step + 1
            window_time += time.perf_counter() - t0
            window_tokens += tokens_per_step
            tok_s = window_tokens / max(window_time, 1e-9)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            if done % cfg.train.log_every == 0 or done == steps:
                log({"step": done, "loss": loss, "lr": lr,
                     "grad_norm": None if grad_norm is None else float(grad_norm),
                     "tokens": done * tokens_per_step, "tokens_per_s": tok_s, "time": time.time()})
                window_time, window_tokens = 0.0, 0
            stopping = stop.agreed(world)
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == steps:
                val_loss = validate(done)
                if bar is not None:
                    bar.write(f"step {done}: train loss {loss:.4f}, val loss {val_loss:.4f}", file=sys.stderr)
                if cfg.train.keep_best and val_loss < best:
                    best = val_loss
                    checkpoint(done, out_dir / "best", keep=1)
            if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or done == steps or stopping:
                check_params_in_sync(model, grid)  # every rank: a diverged replica is an error, not a checkpoint
                last_ckpt = checkpoint(done)
            if stopping:
                if is_rank0:
                    print(f"cke-dist train: stopped by {stop.name} after step {done}; checkpoint {last_ckpt}; "
                          f"continue with --resume {out_dir}", file=sys.stderr)
                steps = done
                break
    finally:
        stop.restore()
    if bar is not None:
        bar.close()
    if start_step >= steps:
        print(f"cke-dist train: checkpoint is at step {start_step}, train.steps is {steps}: nothing to do; "
              f"raise it with --set train.steps=N", file=sys.stderr)

    # rank 0's peak resident memory over the run (`cke-dist plan` predicts it), before any sample
    log({"step": steps, "peak_rss_mib": peak_rss_bytes() / 2**20})
    sample = None
    if cfg.sample.max_new_tokens and tokenizer is None and is_rank0:
        print(f"cke-dist train: no sample: {cfg.model.init_from or 'a model trained on token ids'} has no "
              f"tokenizer", file=sys.stderr)
    if cfg.sample.max_new_tokens and tokenizer is not None and start_step < steps:
        if grid.shape.pp > 1 or cfg.lora.rank:
            # the stages' layers live on other ranks, or the adapters are not merged into a (maybe
            # quantized) base: rank 0 samples from the checkpoint it just wrote
            sample = _sample(cfg, load_model(last_ckpt), tokenizer) if is_rank0 else None
        elif writer_group:
            sample = _sample(cfg, model, tokenizer)   # collective over tp: every rank draws the same tokens
        if is_rank0:
            print(f"--- sample (temperature {cfg.sample.temperature}) ---\n{sample}\n---")
    if is_rank0 and last_ckpt is not None:
        print(f"cke-dist train: step {steps}, train loss {loss:.4f}, val loss {val_loss:.4f}; "
              f"checkpoint {last_ckpt}; loss curves: cke-dist plot {out_dir}", file=sys.stderr)
    return {"model": model, "out_dir": out_dir, "checkpoint": last_ckpt, "step": max(steps, start_step),
            "loss": loss, "val_loss": val_loss, "sample": sample}


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM of its own address space. Not getrusage's
    ru_maxrss: Linux carries that across exec, so a process a big parent started (pytest after a
    few hundred tests, 2.5 GB) reports the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sample(cfg: TrainConfig, model, tokenizer) -> str:
    """Generate from the trained model with the tokenizer its data was read with."""
    ids = generate(model, tokenizer.encode(cfg.sample.prompt), cfg.sample.max_new_tokens,
                   temperature=cfg.sample.temperature, top_k=cfg.sample.top_k or None, seed=cfg.train.seed,
                   stop_ids=tuple(tokenizer.eos_token_ids or ()))
    return cfg.sample.prompt + tokenizer.decode([i for i in ids if i not in (tokenizer.eos_token_ids or ())])
