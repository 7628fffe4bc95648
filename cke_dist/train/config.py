"""Training configuration: plain dataclasses, filled from TOML and `--set section.key=value`.

Rules this module keeps:
- Every key has a default here; a TOML file or `--set` only overrides. The defaults are the
  built-in job (`cke-dist train` with no arguments).
- An unknown section or key is an error that names it and lists the valid ones; a value of the
  wrong type is an error naming the key, the expected type and the value. Nothing is ignored.
- `--set` values are parsed as TOML values (`optim.lr=3e-4`, `model.tie_word_embeddings=true`,
  `data.path="a b.txt"`); a value that is not valid TOML is taken as a bare string, which only
  a string key accepts.
Tests: tests/unit/test_config.py.
"""
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cke_dist.formats.architectures import ARCHITECTURES
from cke_dist.model.lora import LoraSettings


class ConfigError(ValueError):
    """A training config that names an unknown key or gives a value of the wrong type."""


@dataclass
class ModelSection:
    """Hugging Face `config.json` names (see cke_dist.model.LlamaConfig). Ignored when init_from is set."""
    init_from: str = ""          # an HF model directory, a checkpoint or a GGUF file to start from
    model_type: str = "llama"    # "llama" | "qwen2"
    vocab_size: int = 256        # byte tokens
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 0            # 0 = hidden_size // num_attention_heads
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False

    def hf_config(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("init_from")
        if d["head_dim"] == 0:
            d.pop("head_dim")
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        return d


@dataclass
class DataSection:
    path: str = "examples/data/tinyshakespeare.txt"  # a file, directory or glob; relative: cwd, then the repo
    # "auto" (by suffix) | "text" (.txt/.md: a document per file) | "jsonl" ({"text": ...} per line) |
    # "chat" ({"messages": [...]} per line: the model's chat template, loss on the assistant's tokens) |
    # "u16" | "u32" (prepared ids); text is read with the model's tokenizer (bytes for a model of ours)
    format: str = "auto"
    val_path: str = ""           # held-out files for validation; "" = the last val_fraction of data.path
    val_fraction: float = 0.1    # the last fraction of the tokens is the validation split
    batch_size: int = 16         # sequences per micro-batch, summed over data-parallel ranks
    seq_len: int = 128
    grad_accum: int = 1          # micro-batches per optimizer step
    # several documents (text: split at end-of-text) or conversations (chat) per row, positions
    # restarting per document and attention kept inside it; the loss is the unpacked rows'
    pack: bool = False


@dataclass
class OptimSection:
    name: str = "adamw"          # "adamw" | "sgd"
    lr: float = 3e-3
    min_lr: float = 3e-4         # cosine decays to this at train.steps
    warmup_steps: int = 30
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0        # sgd only
    grad_clip: float = 1.0       # global L2 norm; 0 = no clipping


@dataclass
class TrainSection:
    steps: int = 400             # optimizer steps in all (a resumed run continues to this)
    seed: int = 0                # model init and data order
    out_dir: str = ""            # "" = runs/train-<UTC time>
    eval_every: int = 100        # 0 = only at the end
    eval_tokens: int = 8192      # validation scores the first eval_tokens of the val split (seq_len windows)
    keep_best: bool = False      # also keep the checkpoint of the lowest validation loss in out_dir/best
    checkpoint_every: int = 200  # 0 = only at the end
    keep_checkpoints: int = 2    # newest step_* directories kept in out_dir/checkpoints
    checkpoint_timeout: float = 3600.0   # seconds the other ranks wait while rank 0 writes a checkpoint
    log_every: int = 10          # metrics.jsonl lines (rank 0)
    # BLAS + numba threads; 0 = the libraries' defaults. 1 for the built-in model: its GEMMs are too
    # small to gain from a second thread, and on a shared machine synchronised threads lose badly.
    threads: int = 1
    bucket_mb: float = 25.0      # data parallel: gradient bucket size (each allreduced as backward fills it)
    # activation recomputation: "none" keeps every layer's caches for backward, "full" only each layer's
    # input, rerunning the layer's forward in backward (attention keeps no probabilities either way)
    recompute: str = "none"


@dataclass
class ParallelSection:
    """The process grid: dp = world size / (tp * pp), tp ranks adjacent (see cke_dist.parallel.grid)."""
    tp: int = 1                  # tensor parallel: must divide model.num_attention_heads
    pp: int = 1                  # pipeline stages (data.grad_accum micro-batches flow through them)
    pp_layers: list = field(default_factory=list)   # layers per stage, e.g. [3, 5]; [] = even split
    schedule: str = "1f1b"       # "1f1b" | "gpipe" | "zb" (zero-bubble ZB-H1)
    zero: int = 0                # 1: ZeRO-1, optimizer state sharded over dp (gradients reduce-scattered)


@dataclass
class LoraSection:
    """LoRA on a frozen model.init_from (cke_dist.model.lora; PEFT's names and files)."""
    rank: int = 0                # r; 0 = no LoRA: every weight trains
    alpha: float = 16.0          # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0         # on each adapter's input, training only
    targets: str = "q_proj,v_proj"   # a comma list of q/k/v/o/gate/up/down _proj, or "all-linear"
    quantize_base: str = ""      # "" (float32) | "q8_0" | "q4_0" | "q4_1": the frozen projections held quantized (QLoRA)


@dataclass
class SampleSection:
    """The sample printed after training, with the model's tokenizer."""
    prompt: str = "ROMEO:\n"
    max_new_tokens: int = 200    # 0 = no sample
    temperature: float = 0.8
    top_k: int = 0               # 0 = no top-k filter


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    sample: SampleSection = field(default_factory=SampleSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        cfg = cls()
        apply_dict(cfg, d, source)
        return cfg


def to_toml(cfg: TrainConfig, model_config: dict | None = None) -> str:
    """The whole config as TOML that `load_config` reads back to an equal config. With
    `model_config` (the config.json of model.init_from), the [model] section shows init_from and,
    as comments, the model it names instead of the keys init_from makes unused."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        return repr(v)

    lines = []
    for name, section in _sections(cfg).items():
        lines.append(f"[{name}]")
        items = dataclasses.asdict(section).items()
        if name == "model" and model_config is not None:
            lines.append(f"init_from = {value(cfg.model.init_from)}")
            lines.append("# the model init_from names (the other [model] keys are not used):")
            lines += [f"# {k} = {json.dumps(v)}" for k, v in sorted(model_config.items())]
        else:
            lines += [f"{k} = {value(v)}" for k, v in items]
        lines.append("")
    return "\n".join(lines)


def _sections(cfg: TrainConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _coerce(value, typ, key: str, source: str):
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[typ]
    if not ok:
        what = "a list of integers" if typ is list else typ.__name__
        raise ConfigError(f"{source}: {key} must be {what}, got {value!r} ({type(value).__name__})")
    return float(value) if typ is float else list(value) if typ is list else value


def set_value(cfg: TrainConfig, key: str, value, source: str) -> None:
    """Set `section.key` to a parsed value, checking that the key exists and the type fits."""
    sections = _sections(cfg)
    section_name, _, name = key.partition(".")
    if section_name not in sections or not name:
        raise ConfigError(
            f"{source}: unknown key {key!r}; keys are section.name with sections {', '.join(sections)}")
    section = sections[section_name]
    types = {f.name: f.type for f in dataclasses.fields(section)}
    if name not in types:
        raise ConfigError(
            f"{source}: unknown key {key!r}; valid keys in [{section_name}]: {', '.join(types)}")
    typ = {"bool": bool, "int": int, "float": float, "str": str, "list": list}.get(types[name], types[name])
    setattr(section, name, _coerce(value, typ, key, source))


def apply_dict(cfg: TrainConfig, d: dict, source: str) -> None:
    sections = _sections(cfg)
    for section_name, body in d.items():
        if section_name not in sections:
            raise ConfigError(
                f"{source}: unknown section [{section_name}]; valid sections: {', '.join(sections)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table of keys, got {body!r}")
        for name, value in body.items():
            set_value(cfg, f"{section_name}.{name}", value, source)


def _parse_set_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word such as a path; set_value accepts it only for string keys


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> None:
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set optim.lr=1e-3")
        set_value(cfg, key.strip(), _parse_set_value(raw.strip()), f"--set {item}")


def load_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(path=None, overrides=(), base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or `base`), then the TOML file, then `--set` overrides; then validated."""
    cfg = TrainConfig.from_dict(base.to_dict()) if base is not None else TrainConfig()
    if path is not None:
        apply_dict(cfg, load_toml(path), str(path))
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Value ranges that no later step would report as clearly."""
    def need(cond, key, what):
        if not cond:
            section, name = key.split(".")
            raise ConfigError(f"{key} = {getattr(getattr(cfg, section), name)!r}: {what}")

    need(cfg.data.format in ("auto", "text", "jsonl", "chat", "u16", "u32"), "data.format",
         "must be auto, text, jsonl, chat, u16 or u32")
    need(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction", "must be between 0 and 1")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(cfg.data.seq_len >= 1, "data.seq_len", "must be >= 1")
    need(cfg.data.grad_accum >= 1, "data.grad_accum", "must be >= 1")
    need(cfg.optim.name in ("adamw", "sgd"), "optim.name", "must be adamw or sgd")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(0 <= cfg.optim.min_lr <= cfg.optim.lr, "optim.min_lr", "must be between 0 and optim.lr")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")
    need(cfg.train.steps >= 1, "train.steps", "must be >= 1")
    need(cfg.train.eval_every >= 0, "train.eval_every", "must be >= 0")
    need(cfg.train.eval_tokens >= 1, "train.eval_tokens", "must be >= 1")
    need(cfg.train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    need(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(cfg.train.checkpoint_timeout > 0, "train.checkpoint_timeout", "must be > 0 (seconds)")
    need(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    need(cfg.train.bucket_mb > 0, "train.bucket_mb", "must be > 0 (MiB of gradients per allreduce)")
    need(cfg.train.threads >= 0, "train.threads", "must be >= 0")
    need(cfg.train.recompute in ("none", "full"), "train.recompute", "must be none or full")
    need(cfg.parallel.tp >= 1, "parallel.tp", "must be >= 1")
    need(cfg.parallel.pp >= 1, "parallel.pp", "must be >= 1")
    need(cfg.parallel.zero in (0, 1), "parallel.zero", "must be 0 or 1 (ZeRO stage 1)")
    need(cfg.parallel.schedule in ("1f1b", "gpipe", "zb"), "parallel.schedule", "must be 1f1b, gpipe or zb")
    need(not cfg.parallel.pp_layers or (len(cfg.parallel.pp_layers) == cfg.parallel.pp
                                        and min(cfg.parallel.pp_layers) >= 1), "parallel.pp_layers",
         f"needs one layer count >= 1 per stage (parallel.pp = {cfg.parallel.pp}), or [] for an even split")
    if not cfg.model.init_from:
        n = cfg.model.num_hidden_layers
        need(cfg.parallel.pp <= n, "parallel.pp", f"must be <= model.num_hidden_layers ({n})")
        need(not cfg.parallel.pp_layers or sum(cfg.parallel.pp_layers) == n, "parallel.pp_layers",
             f"must sum to model.num_hidden_layers ({n})")
    if not cfg.model.init_from:
        heads = cfg.model.num_attention_heads
        need(heads % cfg.parallel.tp == 0, "parallel.tp",
             f"must divide model.num_attention_heads ({heads}): one of "
             f"{[t for t in range(1, heads + 1) if heads % t == 0]}")
    need(cfg.lora.rank >= 0, "lora.rank", "must be >= 0 (0 = no LoRA)")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(cfg.lora.quantize_base in ("", "q8_0", "q4_0", "q4_1"), "lora.quantize_base",
         "must be \"\" (float32), q8_0, q4_0 or q4_1")
    need(not cfg.lora.quantize_base or cfg.lora.rank, "lora.quantize_base", "quantizes a LoRA base: set lora.rank too")
    if cfg.lora.rank:
        need(bool(cfg.model.init_from), "lora.rank", "LoRA adapts a model: set model.init_from to it (an HF "
             "directory, a checkpoint or a GGUF file)")
        try:
            LoraSettings.parse_targets(cfg.lora.targets)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    need(cfg.sample.max_new_tokens >= 0, "sample.max_new_tokens", "must be >= 0")
    need(cfg.sample.temperature >= 0, "sample.temperature", "must be >= 0 (0 = greedy)")
    need(cfg.sample.top_k >= 0, "sample.top_k", "must be >= 0")
    need(cfg.model.model_type in ARCHITECTURES, "model.model_type", f"must be one of {sorted(ARCHITECTURES)}")
    if not cfg.model.init_from:
        need(cfg.data.seq_len <= cfg.model.max_position_embeddings, "data.seq_len",
             f"must be <= model.max_position_embeddings ({cfg.model.max_position_embeddings})")
