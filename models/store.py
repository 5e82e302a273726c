"""The registry's artifact store: where registered checkpoint files live, behind one small interface.

A store maps a key (`tron/3-<sha256>.safetensors`) to bytes. The database records only the key, so
the same registry works whether the store is a local directory (the default), a shared volume
mounted at a different path on each machine, or an object store reached through fsspec
(`s3://bucket/prefix` with s3fs installed, `memory://` in tests). Readers always get a local file
path (`fetch`), downloaded into a cache for remote stores and checked against its sha256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol


class StoreError(RuntimeError):
    """The store could not write, find or verify an artifact."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ArtifactStore(Protocol):
    def put(self, src: Path, key: str) -> None:
        """Copy a local file in under `key`, atomically: the key holds the whole file or nothing."""

    def fetch(self, key: str, sha256: str | None = None) -> Path:
        """A local path holding the artifact (verified against `sha256` when given)."""

    def delete(self, key: str) -> None:
        """Remove the artifact; a missing key is not an error."""

    def exists(self, key: str) -> bool: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid artifact key {key!r}")
    return key


class DirectoryStore:
    """Artifacts as files under one directory (local disk or a shared volume)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, src: Path, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the destination and rename, so a crash never leaves a half-written artifact.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def fetch(self, key: str, sha256: str | None = None) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise StoreError(f"artifact {key!r} is missing from {self.root}")
        if sha256 is not None and sha256_file(path) != sha256:
            raise StoreError(f"artifact {key!r} in {self.root} does not match its sha256 {sha256[:12]}…")
        return path

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop the model's directory once its last version is gone; keep the root itself.
        try:
            if path.parent != self.root:
                path.parent.rmdir()
        except OSError:
            pass

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


class FsspecStore:
    """Artifacts in any fsspec filesystem (object stores), with a local, sha-checked read cache."""

    def __init__(self, url: str, cache_dir: str | Path | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.prefix = fsspec.core.url_to_fs(self.url)
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "abrec-artifact-cache")

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"

    def _remote(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}"

    def put(self, src: Path, key: str) -> None:
        # Object stores make a single put atomic; the temporary name covers filesystems that don't.
        tmp = self._remote(key) + ".incoming"
        self.fs.put_file(str(src), tmp)
        self.fs.mv(tmp, self._remote(key))

    def fetch(self, key: str, sha256: str | None = None) -> Path:
        local = self.cache_dir / _check_key(key)
        if local.is_file() and (sha256 is None or sha256_file(local) == sha256):
            return local
        if not self.fs.exists(self._remote(key)):
            raise StoreError(f"artifact {key!r} is missing from {self.url}")
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".part")
        self.fs.get_file(self._remote(key), str(tmp))
        if sha256 is not None and sha256_file(tmp) != sha256:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"artifact {key!r} in {self.url} does not match its sha256 {sha256[:12]}…")
        os.replace(tmp, local)
        return local

    def delete(self, key: str) -> None:
        if self.fs.exists(self._remote(key)):
            self.fs.rm_file(self._remote(key))
        (self.cache_dir / _check_key(key)).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._remote(key))


def open_store(spec: str | Path) -> ArtifactStore:
    """A store from a setting: a plain path or file:// URL is a directory, any other URL goes to fsspec."""
    text = str(spec)
    if "://" not in text:
        return DirectoryStore(text)
    if text.startswith("file://"):
        return DirectoryStore(text.removeprefix("file://"))
    return FsspecStore(text)
