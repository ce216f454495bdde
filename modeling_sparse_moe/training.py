"""Training helpers that keep a run's work safe.

What transformers 5.24 guarantees, and what it does not (read from `Trainer._save_checkpoint` and
`PreTrainedModel.save_pretrained`):
  - `Trainer` writes `checkpoint-N` in place: weights first, then optimizer, scheduler and RNG states, and
    `trainer_state.json` last. Older checkpoints are rotated away only after that. A crash mid-save therefore leaves
    the previous checkpoint intact and a `checkpoint-N` without `trainer_state.json`, possibly with a truncated
    `model.safetensors`.
  - But `get_last_checkpoint`, which `train(resume_from_checkpoint=True)` uses, picks the highest `checkpoint-N`
    folder whether or not it is complete. `last_complete_checkpoint` below skips the incomplete ones.
  - `save_pretrained` also writes in place: a crash while overwriting a folder leaves neither the old nor the new
    model. `atomic_save_pretrained` writes a sibling folder and swaps it in with renames.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from safetensors import safe_open
from transformers import TrainerCallback

from .modeling_sparse_moe import update_router_biases

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
_INDEX_FILE = "model.safetensors.index.json"


class RouterBiasUpdateCallback(TrainerCallback):
    """DeepSeek-V3 aux-loss-free balancing for `Trainer`: after every optimizer step, nudge each router's
    `e_score_correction_bias` by `config.router_bias_update_rate * sign(mean load - load)`, using the expert loads of
    all micro-batches of that step. A no-op while the rate is 0.

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RouterBiasUpdateCallback()])
    """

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            update_router_biases(model)


def atomic_save_pretrained(model, path: str | os.PathLike, **kwargs) -> str:
    """`model.save_pretrained(path, **kwargs)` that never leaves `path` half-written.

    The model is saved into a temporary folder next to `path` (same filesystem, so renames are atomic), flushed to
    disk, then renamed over `path`. If saving fails, `path` is untouched and the temporary folder is removed. An
    existing `path` is first renamed to `.NAME.old-*` and deleted once the new folder is in place; a crash between
    those two renames leaves the previous save there, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, **kwargs)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return str(path)


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a `Trainer` checkpoint folder was fully written: `trainer_state.json` (written last) parses and names
    the folder's step, and every safetensors weight file it holds has a readable, fully covered header."""
    folder = Path(folder)
    match = _CHECKPOINT_RE.match(folder.name)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if match is not None and state.get("global_step") != int(match.group(1)):
        return False
    weights = [folder / name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if (folder / _INDEX_FILE).is_file():
        try:
            shards = set(json.loads((folder / _INDEX_FILE).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        weights += [folder / shard for shard in sorted(shards)]
    if not weights:
        return False
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception:  # noqa: BLE001  (missing, truncated or corrupt: not complete, whatever the reason)
            return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-step complete `checkpoint-N` folder in `output_dir`, or None. Pass it as
    `trainer.train(resume_from_checkpoint=...)` instead of `True`, which would pick an incomplete one."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))),
        reverse=True,
    )
    for _, folder in steps:
        if is_complete_checkpoint(folder):
            return str(folder)
    return None


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory descriptors (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


__all__ = ["atomic_save_pretrained", "is_complete_checkpoint", "last_complete_checkpoint"]
