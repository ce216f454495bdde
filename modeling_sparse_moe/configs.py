"""The model configs in the repository's `configs/` folder, by name, from any working directory.

    from transformers import AutoConfig
    from modeling_sparse_moe.configs import config_path

    config = AutoConfig.from_pretrained(config_path("tiny"))        # works in any folder, not only the repo root

`AutoConfig.from_pretrained("configs/tiny")` reads a path relative to the current folder, and anywhere but the
repository root transformers takes it for a Hub repository name and fails with a connection error.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def available_configs() -> list[str]:
    """Names of the model configs shipped in `configs/` (folders holding a `config.json`)."""
    if not CONFIGS_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in CONFIGS_DIR.glob("*/config.json"))


def config_path(name: str) -> str:
    """The folder of the shipped model config `name` (e.g. "tiny", "demo"), for `AutoConfig.from_pretrained`."""
    folder = CONFIGS_DIR / name
    if (folder / "config.json").is_file():
        return str(folder)
    if not CONFIGS_DIR.is_dir():
        raise FileNotFoundError(
            f"No configs/ folder next to the package ({CONFIGS_DIR}): the model configs ship with the source "
            "checkout (git clone + pip install -e .). Pass a folder holding a config.json instead."
        )
    raise ValueError(f"Unknown model config {name!r}; shipped configs: {', '.join(available_configs())}.")


def resolve_config_name(name: str) -> str:
    """What recipes do with `--config_name`: a shipped config's name ("tiny", or "configs/tiny" from any folder), or
    an existing folder path / a Hub name, left as given."""
    if Path(name).exists():
        return name
    for candidate in (CONFIGS_DIR / name, CONFIGS_DIR.parent / name):
        if "/" not in name or candidate.parent.resolve() == CONFIGS_DIR.resolve():
            if (candidate / "config.json").is_file():
                return str(candidate)
    return name


__all__ = ["CONFIGS_DIR", "available_configs", "config_path", "resolve_config_name"]
