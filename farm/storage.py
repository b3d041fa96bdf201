"""Sinks: where video files go — a local directory or an S3 bucket (boto3).

Writes are atomic and checksummed: a local file is written under a temporary name and renamed;
an S3 object only becomes visible when its upload completes (a failed multipart upload is
aborted), and is checked after upload (size and sha256) before it counts. Credentials come only
from boto3's usual chain (environment, profile, instance role) and are never printed or recorded.

Layout under a sink: ``<task_id>.mp4``, ``<task_id>.jpg`` and ``<task_id>.json``. The JSON
record is written last: it is the commit marker that says the clip is complete, so a driver that
died before cataloguing a finished clip can adopt it instead of rendering it again. Keys come
from task ids only, never from prompt text.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

from farm.config import (
    S3_CONNECT_TIMEOUT_S,
    S3_HEAD_THREADS,
    S3_LIST_FROM,
    S3_MAX_ATTEMPTS,
    S3_MULTIPART_CHUNK_MB,
    S3_MULTIPART_THRESHOLD_MB,
    S3_READ_TIMEOUT_S,
)
from farm.errors import FarmError
from farm.task import StorageKind, spec

_CHUNK = 1 << 20
# S3 key characters that are safe everywhere (AWS's "safe characters" list).
_SAFE_KEY_PART = re.compile(r"^[A-Za-z0-9!_.*'()-]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageError(FarmError):
    """An output location is invalid or cannot be written."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach an S3-compatible store (MinIO, Ceph, R2, SeaweedFS…) for ``output: s3://…``:
    the manifest's ``storage:`` keys are these fields. Unset fields fall back to boto3's own
    configuration (AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, ~/.aws/config). Credentials are
    never set here: they come from boto3's usual chain (environment, profile, instance role)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    multipart_threshold_mb: int = field(default=S3_MULTIPART_THRESHOLD_MB, metadata=spec(ge=5, le=5120))
    multipart_chunk_mb: int = field(default=S3_MULTIPART_CHUNK_MB, metadata=spec(ge=5, le=5120))
    max_attempts: int = field(default=S3_MAX_ATTEMPTS, metadata=spec(ge=1, le=20))
    connect_timeout_s: float = field(default=S3_CONNECT_TIMEOUT_S, metadata=spec(gt=0, le=600))
    read_timeout_s: float = field(default=S3_READ_TIMEOUT_S, metadata=spec(gt=0, le=3600))

    def to_json(self) -> str:
        """What the job record keeps: the options that differ from the defaults."""
        defaults = StorageOptions()
        return json.dumps(
            {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | None) -> StorageOptions:
        return cls(**json.loads(text or "{}"))


@dataclass(frozen=True)
class OutputTarget:
    """Where a job's files go, parsed once from the manifest (or --output): a local directory or
    ``s3://bucket/prefix``, with the options to reach it."""

    uri: str
    options: StorageOptions = StorageOptions()

    @property
    def kind(self) -> StorageKind:
        return StorageKind.of(self.uri)


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

    def get_file(self, name: str, local: Path) -> StoredObject: ...

    def matches(self, name: str, sha256: str) -> bool: ...

    def abort_incomplete(self, names: set[str]) -> int: ...

    def check_writable(self) -> None: ...

    def sizes(self, names: Iterable[str]) -> dict[str, int | None]: ...

    def sha256_of(self, name: str) -> str | None: ...

    def discard(self, names: Iterable[str]) -> None: ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → (``bucket``, ``a/b``), refusing anything that could escape the prefix."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise StorageError(
            f"{uri}: {bucket!r} is not a valid bucket name", hint="use 3-63 lower-case letters, digits, '.' or '-'"
        )
    parts = [p for p in prefix.split("/") if p != ""] if prefix else []
    if prefix and (prefix.startswith("/") or "//" in prefix):
        raise StorageError(f"{uri}: empty path segment in the prefix", hint="remove the doubled '/'")
    for part in parts:
        if part in (".", ".."):
            raise StorageError(
                f"{uri}: '{part}' is not allowed in an output prefix",
                hint="write the prefix without '.' or '..' segments",
            )
        if not _SAFE_KEY_PART.match(part):
            raise StorageError(
                f"{uri}: {part!r} has characters that are unsafe in object keys",
                hint="use letters, digits and !_.*'()- in prefixes",
            )
    return bucket, "/".join(parts)


def check_output(uri: str) -> None:
    """Reject outputs farm must not write to, before anything renders."""
    if StorageKind.of(uri) is StorageKind.S3:
        split_s3_uri(uri)
    elif "://" in uri:
        raise StorageError(f"output {uri}: unsupported scheme", hint="use a local directory or s3://bucket/prefix")
    elif any(ord(c) < 32 for c in uri):
        raise StorageError("output path has control characters", hint="use a plain directory path")


class LocalSink:
    """A directory on a local or shared filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _temp(self, name: str) -> Path:
        return self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"

    def put_file(self, local: Path, name: str) -> StoredObject:
        self.root.mkdir(parents=True, exist_ok=True)
        target, temp = self.root / name, self._temp(name)
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
        target, temp = self.root / name, self._temp(name)
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
        try:
            return sha256_file(self.root / name) == sha256
        except OSError:
            return False

    def get_json(self, name: str) -> dict | None:
        try:
            return json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return None

    def get_file(self, name: str, local: Path) -> StoredObject:
        """Copy a stored file to ``local``: its URI, size and the sha256 of the bytes copied."""
        shutil.copyfile(self.root / name, local)
        return StoredObject(str(self.root / name), local.stat().st_size, sha256_file(local))

    def abort_incomplete(self, names: set[str]) -> int:
        """Remove temporary files a killed writer left for these names."""
        # One listing of the folder, not a glob per name: admission calls this for every task to do.
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            name, sep, _ = entry.name[1:].rpartition(".tmp-")
            if entry.name.startswith(".") and sep and name in names:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed

    def check_writable(self) -> None:
        """Fail before rendering, not at the first clip's write, on a folder that cannot be
        created or written. Creates nothing: a probe is made and removed in the folder, or in its
        nearest existing parent when the folder does not exist yet (``farm plan`` leaves no trace)."""
        probe_in = self.root
        while not probe_in.exists() and probe_in.parent != probe_in:
            probe_in = probe_in.parent
        try:
            if not probe_in.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(probe_in))
            probe = probe_in / f".farm-probe-{uuid.uuid4().hex[:8]}"
            probe.mkdir()  # a folder, not a file: creating the output needs exactly this right
            probe.rmdir()
        except OSError as exc:
            raise StorageError(
                f"{self.uri}: cannot {'write to' if probe_in == self.root else 'create'} this folder "
                f"({exc.strerror or exc} at {probe_in})",
                field="output",
                hint="choose a folder you can write, with --output or the manifest's output:",
            ) from None

    def sizes(self, names: Iterable[str]) -> dict[str, int | None]:
        """Each name's size in bytes, None where there is no such file (one stat each)."""
        out: dict[str, int | None] = {}
        for name in names:
            try:
                out[name] = os.stat(self.root / name).st_size
            except FileNotFoundError:
                out[name] = None
        return out

    def sha256_of(self, name: str) -> str | None:
        try:
            return sha256_file(self.root / name)
        except FileNotFoundError:
            return None

    def discard(self, names: Iterable[str]) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)


def s3_client(options: StorageOptions):
    """A boto3 S3 client from the usual credential chain, with retries and timeouts set."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=options.profile, region_name=options.region)
    config = Config(
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        s3={"addressing_style": "path"} if options.endpoint_url else {},
        # Extra request checksums are not understood by every S3-compatible server; farm checks
        # its own sha256 after every upload instead.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=options.endpoint_url, config=config)


class S3Sink:
    """A prefix in an S3 bucket. The sha256 of each object is stored as its metadata."""

    def __init__(self, uri: str, options: StorageOptions) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client(options)
        mb = 1024 * 1024
        self.transfer = TransferConfig(
            multipart_threshold=options.multipart_threshold_mb * mb,
            multipart_chunksize=options.multipart_chunk_mb * mb,
            use_threads=False,  # renderers already use the cores; uploads are one per clip
        )

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check_writable(self) -> None:
        """Fail fast, at plan time, on a missing bucket or an unreachable endpoint."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise StorageError(
                f"output {self.uri}: bucket {self.bucket!r} is not accessible ({code})",
                field="output",
                hint="create the bucket or check the credentials' permissions",
            ) from None
        except BotoCoreError as exc:
            raise StorageError(
                f"output {self.uri}: cannot reach S3 ({exc})",
                field="output",
                hint="check storage.endpoint_url / AWS_ENDPOINT_URL and that the server runs",
            ) from None

    def put_file(self, local: Path, name: str) -> StoredObject:
        checksum = sha256_file(local)
        size = local.stat().st_size
        key = self._key(name)
        # upload_file aborts its multipart upload if a part fails, so no partial object stays.
        self.client.upload_file(
            str(local),
            self.bucket,
            key,
            Config=self.transfer,
            ExtraArgs={"Metadata": {"sha256": checksum}, "ContentType": _content_type(name)},
        )
        self._verify(key, size, checksum)
        return StoredObject(f"s3://{self.bucket}/{key}", size, checksum)

    def put_json(self, record: dict, name: str) -> StoredObject:
        data = json.dumps(record, sort_keys=True).encode()
        checksum = hashlib.sha256(data).hexdigest()
        key = self._key(name)
        self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType="application/json", Metadata={"sha256": checksum}
        )
        self._verify(key, len(data), checksum)
        return StoredObject(f"s3://{self.bucket}/{key}", len(data), checksum)

    def _verify(self, key: str, size: int, checksum: str) -> None:
        head = self.client.head_object(Bucket=self.bucket, Key=key)
        stored = head.get("Metadata", {}).get("sha256")
        if head.get("ContentLength") != size or stored != checksum:
            raise StorageError(
                f"s3://{self.bucket}/{key}: stored object does not match what was uploaded "
                f"({head.get('ContentLength')} bytes, sha256 {stored})"
            )

    def get_json(self, name: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
            return json.loads(body)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        except ValueError:
            return None

    def get_file(self, name: str, local: Path) -> StoredObject:
        """Download a stored object to ``local``: its URI, size and the sha256 of the bytes downloaded."""
        key = self._key(name)
        self.client.download_file(self.bucket, key, str(local), Config=self.transfer)
        return StoredObject(f"s3://{self.bucket}/{key}", local.stat().st_size, sha256_file(local))

    def matches(self, name: str, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError:
            return False
        return head.get("Metadata", {}).get("sha256") == sha256

    def sizes(self, names: Iterable[str]) -> dict[str, int | None]:
        """Each name's size in bytes, None where there is no such object: a few names by HEADs in
        parallel, many (``S3_LIST_FROM`` and up) by listing the prefix, a thousand keys a request."""
        wanted = list(names)
        if len(wanted) >= S3_LIST_FROM:
            listed = self._listed_sizes()
            return {name: listed.get(self._key(name)) for name in wanted}
        with ThreadPoolExecutor(max_workers=S3_HEAD_THREADS) as pool:
            return dict(zip(wanted, pool.map(self._head_size, wanted), strict=True))

    def _listed_sizes(self) -> dict[str, int]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        sizes: dict[str, int] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            sizes.update((o["Key"], o["Size"]) for o in page.get("Contents", []) or [])
        return sizes

    def _head_size(self, name: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def sha256_of(self, name: str) -> str | None:
        """The sha256 of the object's bytes as read back now (not the metadata farm stored with it)."""
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        digest = hashlib.sha256()
        for chunk in body.iter_chunks(_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()

    def discard(self, names: Iterable[str]) -> None:
        keys = [{"Key": self._key(n)} for n in names]
        if keys:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def abort_incomplete(self, names: set[str]) -> int:
        """Abort multipart uploads a dead renderer left for these objects (they are invisible, but
        their parts cost storage until aborted)."""
        keys = {self._key(n) for n in names}
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for upload in page.get("Uploads", []) or []:
                if upload["Key"] in keys:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted


def _content_type(name: str) -> str:
    return {".mp4": "video/mp4", ".jpg": "image/jpeg", ".json": "application/json"}.get(
        Path(name).suffix, "application/octet-stream"
    )


def open_sink(target: OutputTarget) -> Sink:
    check_output(target.uri)
    if target.kind is StorageKind.S3:
        return S3Sink(target.uri, target.options)
    return LocalSink(target.uri)
