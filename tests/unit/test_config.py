"""TrainConfig: defaults, TOML, --set, and clear errors for unknown keys and bad values."""

import pytest

from mpirun import REPO

from cke_dist.train.config import ConfigError, TrainConfig, load_config, to_toml

EXAMPLES = REPO / "examples"


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.model.vocab_size == 256 and cfg.data.path.endswith("tinyshakespeare.txt")


def test_toml_then_set(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[optim]\nname = "sgd"\nlr = 0.5\nmin_lr = 0.1\n[data]\nseq_len = 32\n')
    cfg = load_config(p, ["optim.lr=0.25", "model.tie_word_embeddings=false", "data.path=some dir/x.u16",
                          'sample.prompt="a = b"', "train.steps=7"])
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.25 and cfg.optim.min_lr == 0.1
    assert cfg.data.seq_len == 32 and cfg.model.tie_word_embeddings is False
    assert cfg.data.path == "some dir/x.u16" and cfg.sample.prompt == "a = b" and cfg.train.steps == 7
    # an int is accepted where a float is expected, and stored as float
    cfg = load_config(None, ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float)


def test_round_trip_dict():
    cfg = load_config(None, ["model.hidden_size=64", "train.seed=3"])
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_unknown_key_names_it_and_lists_valid(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[optim]\nlrr = 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "c.toml" in msg and "'optim.lrr'" in msg and "lr, min_lr" in msg
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\].*optim"):
        TrainConfig.from_dict({"optimizer": {"lr": 1}})
    with pytest.raises(ConfigError, match=r"'model\.hiden_size'.*hidden_size"):
        load_config(None, ["model.hiden_size=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        load_config(None, ["lr=3"])


def test_wrong_types_and_ranges():
    with pytest.raises(ConfigError, match=r"data\.batch_size must be int, got 'many'"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match=r"model\.tie_word_embeddings must be bool"):
        load_config(None, ["model.tie_word_embeddings=1"])
    with pytest.raises(ConfigError, match=r"optim\.name.*adamw or sgd"):
        load_config(None, ["optim.name=lion"])
    with pytest.raises(ConfigError, match=r"data\.seq_len.*max_position_embeddings"):
        load_config(None, ["data.seq_len=100000"])
    with pytest.raises(ConfigError, match=r"val_fraction"):
        load_config(None, ["data.val_fraction=0"])


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[optim\n")
    with pytest.raises(ConfigError, match="c.toml.*not valid TOML"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="nothere.toml"):
        load_config(tmp_path / "nothere.toml")


def test_shipped_examples_load():
    files = sorted(EXAMPLES.glob("*.toml"))
    assert files, "examples/*.toml missing"
    for f in files:
        load_config(f)


def test_to_toml_round_trips(tmp_path):
    cfg = load_config(None, ['sample.prompt="a \\"quoted\\"\\nline"', "optim.eps=1e-8", "model.tie_word_embeddings=false"])
    p = tmp_path / "all.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg
