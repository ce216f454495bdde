# Copyright 2026 The sparse-moe authors. Licensed under the Apache License, Version 2.0.
"""Streaming safetensors reading and writing for conversion and export: tensor sources (an in-memory state dict, a
checkpoint folder read one tensor at a time), a sharded writer that holds at most one shard, and an output folder that
appears atomically (complete, or not at all).

Not Hub-facing: it may import anything installed. Knows nothing of model families (`families.py`) or of what a
conversion builds (`conversion.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transformers.utils import logging
from transformers.utils.hub import convert_file_size_to_int


class TensorSource(Protocol):
    """Where a plan reads tensors: an in-memory state dict, a safetensors folder, or a family view of either."""

    def __contains__(self, key: str) -> bool: ...
    def get(self, key: str) -> torch.Tensor: ...
    def dtype_of(self, key: str) -> torch.dtype: ...


Recipe = Callable[[TensorSource], torch.Tensor]  # builds one target tensor
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# Files a folder conversion must not carry over: weights, configs and code are rewritten for the target format.
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|py|msgpack|h5)$|.*\.index\.json$|config\.json$|README\.md$")
DEFAULT_MAX_SHARD_SIZE = "5GB"



# ============================================================================================================== sources
class _StateDictSource:
    """Tensors of an in-memory model, by their in-memory names."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self._state_dict = state_dict

    def __contains__(self, key: str) -> bool:
        return key in self._state_dict

    def keys(self):
        return self._state_dict.keys()

    def get(self, key: str) -> torch.Tensor:
        if key not in self._state_dict:
            raise KeyError(key)
        return self._state_dict[key].detach()

    def dtype_of(self, key: str) -> torch.dtype:
        return self._state_dict[key].dtype

    def close(self):
        pass


class _SafetensorsFolder:
    """Tensors of a safetensors checkpoint folder (one file or an index plus shards), read one at a time.

    NOTE: at most one shard is open. `safe_open` memory-maps its file and the pages a read touches count towards the
    process's resident memory until the map is closed, so keeping every shard open (or tensors that view the map)
    would grow RSS to the checkpoint size over a conversion."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self._weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                found = sorted(p.name for p in self.folder.glob("*.bin"))
                hint = f" (found {found}: load it and save_pretrained it once to get safetensors)" if found else ""
                raise ValueError(f"No safetensors weights in {self.folder}{hint}.")
            self._weight_map = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    self._weight_map.update(dict.fromkeys(handle.keys(), file.name))
        missing = sorted({name for name in self._weight_map.values() if not (self.folder / name).is_file()})
        if missing:
            raise ValueError(f"{self.folder}: shards {missing} listed in the index are missing.")
        self._open_name = None
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self._weight_map

    def keys(self):
        return self._weight_map.keys()

    def _file(self, key: str):
        name = self._weight_map[key]
        if name != self._open_name:
            self.close()
            self._handle = safe_open(self.folder / name, framework="pt")
            self._open_name = name
        return self._handle

    def get(self, key: str) -> torch.Tensor:
        # NOTE: `get_tensor` returns a view into the memory map, which keeps the whole map (and every page read from
        # it) resident for as long as the tensor lives. A copy lets the map go when the next shard is opened.
        return self._file(key).get_tensor(key).clone()

    def dtype_of(self, key: str) -> torch.dtype:
        """Read from the header only: no tensor data is loaded."""
        name = self._file(key).get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(name) or getattr(torch, name.lower())

    def close(self):
        self._handle, self._open_name = None, None



# ============================================================================================================== writing
def _write_plan(
    plan: dict[str, Recipe],
    source,
    folder: Path,
    max_shard_size: int | str,
    disk_items: Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]] | None = None,
) -> None:
    # A progress bar over the tensors (transformers' tqdm: `disable_progress_bar()` / HF_HUB_DISABLE_PROGRESS_BARS
    # silence it), with the shard being filled and the bytes written so far; a line as each shard is written.
    bar = logging.tqdm(plan.items(), total=len(plan), desc="converting", unit="tensor")
    writer = _ShardWriter(folder, convert_file_size_to_int(max_shard_size), on_shard=bar.write)
    for key, recipe in bar:
        tensor = recipe(source)
        for disk_key, disk_tensor in disk_items(key, tensor) if disk_items else ((key, tensor),):
            writer.add(disk_key, disk_tensor)
        del tensor
        bar.set_postfix(shard=len(writer._shards) + 1, written=f"{writer._total_bytes / 2**30:.2f} GiB", refresh=False)
    writer.finish()
    bar.close()


class _ShardWriter:
    """Sharded safetensors output in transformers' layout (`model.safetensors`, or numbered shards plus
    `model.safetensors.index.json`). Holds at most one shard's tensors."""

    def __init__(self, folder: Path, max_shard_bytes: int, on_shard: Callable[[str], None] | None = None):
        self.folder, self.max_shard_bytes, self.on_shard = Path(folder), max_shard_bytes, on_shard
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0
        self._seen: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._seen:
            raise ValueError(f"Tensor {key!r} written twice.")
        self._seen.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.partial"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        if self.on_shard is not None:
            self.on_shard(f"shard {len(self._shards)}: {len(self._pending)} tensors, "
                          f"{self._pending_bytes / 2**30:.2f} GiB written ({self._total_bytes / 2**30:.2f} GiB so far)")
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for number, (path, keys) in enumerate(self._shards, start=1):
            name = f"model-{number:05d}-of-{len(self._shards):05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, generation config, ...: every top-level file that is not weights, config or code."""
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and not _NOT_COPIED.fullmatch(path.name):
            shutil.copy2(path, Path(dst) / path.name)


@contextlib.contextmanager
def _atomic_output_dir(dst: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `dst`; rename it to `dst` on success, delete it on any failure."""
    dst = Path(dst).absolute()
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())) and not overwrite:
        raise ValueError(f"{dst} already exists; choose a new folder or pass overwrite=True (--overwrite).")
    created = [parent for parent in reversed(dst.parents) if not parent.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if we created it and it is still empty
        raise


__all__ = ["TensorSource", "Recipe", "DEFAULT_MAX_SHARD_SIZE"]
