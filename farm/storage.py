"""Sinks: where video files go. Writes are atomic (temp name, then rename) and checksummed.

Layout under a sink: ``<task_id>.mp4``, ``<task_id>.jpg`` and ``<task_id>.json``. The JSON
record is written last: it is the commit marker that says the clip is complete, so a driver that
died before cataloguing a finished clip can adopt it instead of rendering it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from farm.errors import FarmError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredObject:
    uri: str
    bytes: int
    sha256: str


class Sink(Protocol):
    uri: str

    def put_file(self, local: Path, name: str) -> StoredObject: ...

    def put_json(self, record: dict, name: str) -> StoredObject: ...

    def get_json(self, name: str) -> dict | None: ...

    def object_uri(self, name: str) -> str: ...

    def matches(self, name: str, sha256: str) -> bool: ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LocalSink:
    """A directory on a local or shared filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def object_uri(self, name: str) -> str:
        return str(self.root / name)

    def put_file(self, local: Path, name: str) -> StoredObject:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / name
        temp = self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(local, temp)
            checksum = sha256_file(temp)
            size = temp.stat().st_size
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        return StoredObject(str(target), size, checksum)

    def put_json(self, record: dict, name: str) -> StoredObject:
        self.root.mkdir(parents=True, exist_ok=True)
        data = json.dumps(record, sort_keys=True).encode()
        target = self.root / name
        temp = self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with temp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        return StoredObject(str(target), len(data), hashlib.sha256(data).hexdigest())

    def matches(self, name: str, sha256: str) -> bool:
        """Whether the object exists with this checksum."""
        try:
            return sha256_file(self.root / name) == sha256
        except OSError:
            return False

    def get_json(self, name: str) -> dict | None:
        try:
            return json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return None


def open_sink(uri: str) -> Sink:
    if uri.startswith("s3://"):
        raise FarmError(
            f"output {uri}: S3 outputs are not available in this version of farm",
            field="output",
            hint="use a local directory for now",
        )
    if "://" in uri:
        raise FarmError(f"output {uri}: unsupported scheme", field="output", hint="use a local directory")
    return LocalSink(uri)
