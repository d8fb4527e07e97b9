"""The compile cache: one folder per (model identity, backend, mode, hardware, torch version, shape ranges).

A second pod on the same hardware finds the folder its init container (`kubeforge-serve compile`) or an
earlier pod wrote, and loads instead of compiling. Writes are atomic (write to a temporary name, rename), so
pods sharing a volume never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 1  # bump when the layout of a cache entry changes


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything that makes a compiled artifact reusable."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CacheEntry:
    root: Path  # the cache entry's folder
    key: str
    parts: dict[str, Any]

    @classmethod
    def open(cls, cache_dir: Path, model_name: str, parts: dict[str, Any]) -> CacheEntry:
        key = cache_key(parts)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[:64]
        root = cache_dir / safe / key
        root.mkdir(parents=True, exist_ok=True)
        entry = cls(root, key, parts)
        if not (root / "key.json").exists():
            entry.write_bytes("key.json", json.dumps(parts, indent=2, sort_keys=True, default=str).encode())
        return entry

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def write_bytes(self, name: str, data: bytes) -> Path:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.root / name)
        return self.root / name

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, name: str) -> Any:
        return json.loads((self.root / name).read_text())

    def temp_path(self, name: str) -> Path:
        """A private path to build `name` at before `commit` renames it into place."""
        return self.root / f".{name}.{os.getpid()}.tmp"

    def commit(self, tmp: Path, name: str) -> Path:
        os.replace(tmp, self.root / name)
        return self.root / name
