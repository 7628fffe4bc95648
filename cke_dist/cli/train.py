"""`cke-dist train [CONFIG.toml] [--set section.key=value ...] [--resume DIR]`: the training job
(cke_dist/train/loop.py)."""
import sys

from cke_dist.formats.checkpoint import CheckpointError
from cke_dist.formats.hf import HFFormatError
from cke_dist.train.config import ConfigError, to_toml
from cke_dist.train.data import DataError
from cke_dist.train.loop import model_config, resolve_config, train


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config (default: the built-in Tiny Shakespeare job)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue from a checkpoint directory, or the newest checkpoint of a run directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key) as TOML and exit")


def run(args) -> int:
    try:
        cfg, resume = resolve_config(args.config, args.overrides, args.resume)
        if args.print_config:
            print(to_toml(cfg, model_config(cfg).to_dict() if cfg.model.init_from else None), end="")
            return 0
        train(cfg, resume=resume, progress=not args.no_progress)
    except (ConfigError, DataError, CheckpointError, HFFormatError, FileNotFoundError) as e:
        print(f"cke-dist train: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"cke-dist train: error: {e}", file=sys.stderr)
        return 1
    return 0
