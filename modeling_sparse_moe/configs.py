"""The shipped model configs, by name, from any working directory and from an installed wheel.

    from transformers import AutoConfig
    from modeling_sparse_moe.configs import config_path

    config = AutoConfig.from_pretrained(config_path("tiny"))        # works in any folder, not only the repo root

`AutoConfig.from_pretrained("configs/tiny")` reads a path relative to the current folder, and anywhere but the
repository root transformers takes it for a Hub repository name and fails with a connection error.

The configs live inside the package (`modeling_sparse_moe/model_configs/`, package data, so a wheel carries them);
the repository's top-level `configs/` is a link to that folder, so `--config_name configs/tiny` and
`accelerate launch --config_file configs/accelerate/ddp.yaml` keep working in a source checkout.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"


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
            f"The package's model configs are missing ({CONFIGS_DIR}): reinstall sparse-moe, or pass a folder "
            "holding a config.json instead."
        )
    raise ValueError(f"Unknown model config {name!r}; shipped configs: {', '.join(available_configs())}.")


def resolve_config_name(name: str) -> str:
    """What recipes do with `--config_name`: a shipped config's name ("tiny", or "configs/tiny" from any folder), or
    an existing folder path / a Hub name, left as given."""
    if Path(name).exists():
        return name
    short = name.removeprefix("configs/")  # the repository's top-level spelling
    if "/" not in short and (CONFIGS_DIR / short / "config.json").is_file():
        return str(CONFIGS_DIR / short)
    return name


__all__ = ["CONFIGS_DIR", "available_configs", "config_path", "resolve_config_name"]
