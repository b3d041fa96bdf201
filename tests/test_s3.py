"""Outputs and the catalog on a real S3-compatible server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import hashlib
from collections import Counter

import duckdb
import pandas as pd
import pytest
from fsspec.implementations.arrow import ArrowFSWrapper

from farm import api
from farm.catalog import Catalog, catalog_filesystem
from farm.errors import FarmError
from farm.faults import Fault
from farm.manifest import load_manifest
from farm.storage import OutputTarget, S3Sink, StorageOptions, open_sink

pytestmark = pytest.mark.ray

JOB = """
campaign: s3job
prompt: "clip {n}"
render: {width: 32, height: 32, frames: 5, steps: 2}
axes:
  n: [1, 2, 3, 4, 5, 6, 7, 8]
output: s3://BUCKET/campaigns/s3job
storage: {max_attempts: 2}
retries: 1
"""


def objects(s3, prefix: str) -> dict[str, dict]:
    client = s3.client()
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o for o in listed}


def test_job_writes_clips_to_s3_with_checksums_matching_the_catalog(ray_local, farm_home, write_manifest, s3):
    manifest = write_manifest(JOB.replace("BUCKET", s3.bucket))
    outcome = api.submit(manifest, workers=2)
    assert (outcome.run.succeeded, outcome.run.failed) == (8, 0)
    listed = objects(s3, "campaigns/s3job/")
    assert sorted({k.rsplit(".", 1)[1] for k in listed}) == ["jpg", "json", "mp4"] and len(listed) == 24
    client = s3.client()
    _, rows = api.results(outcome.job_id)
    for row in rows:
        key = f"campaigns/s3job/{row['task_id']}.mp4"
        assert row["output_uri"] == f"s3://{s3.bucket}/{key}" and row["storage"] == "s3"
        body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == row["sha256"] and len(body) == row["bytes"]
        assert client.head_object(Bucket=s3.bucket, Key=key)["Metadata"]["sha256"] == row["sha256"]
    # Credentials never reach the catalog or the outputs.
    table = Catalog(farm_home / "catalog").attempts()
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in str(table.to_pylist())
    jobs = Catalog(farm_home / "catalog").jobs()
    assert all(s3.env["AWS_SECRET_ACCESS_KEY"] not in repr(j) for j in jobs)


def test_server_stopped_mid_job_fails_clearly_then_resubmit_completes_without_duplicates(
    ray_local, farm_home, write_manifest, s3, faults
):
    manifest = write_manifest(JOB.replace("BUCKET", s3.bucket))
    stopped = []

    def stop_after_three(progress) -> None:
        if progress.succeeded >= 3 and not stopped:
            s3.stop()
            stopped.append(progress.succeeded)

    # Clips take 0.8 s more each, so the server goes down while most of the job is still to do.
    faults(Fault("clip", action="slow", hang_s=0.8))
    first = api.submit(manifest, workers=2, on_progress=stop_after_three)
    faults()
    assert stopped
    # Known open question (see the closing note): now and then, under load, this first job's
    # summary counts fewer renders than the progress it reported; what must hold is checked
    # here and, after the re-submit, exactly-once over the catalog and the bucket.
    _, rows = api.results(first.job_id, catalog_root=None)
    failed = [r for r in rows if r["status"] == "failed"]
    assert all("Could not connect to the endpoint URL" in r["error"] for r in failed)
    # Each was retried (retries: 1) before giving up, or its renderers were taken out of the job
    # after repeated failures (the bad-renderer limit); either way the error says why.
    assert all(r["attempt"] >= 1 for r in failed)

    s3.start()
    second = api.submit(manifest, workers=2)
    assert second.run.failed == 0
    assert api.status(second.job_id).counts == {"succeeded": 8, "failed": 0, "pending": 0}
    catalog = Catalog(farm_home / "catalog")
    succeeded = Counter(r["task_id"] for r in catalog.attempts().to_pylist() if r["status"] == "succeeded")
    assert len(succeeded) == 8 and set(succeeded.values()) == {1}
    listed = objects(s3, "campaigns/s3job/")
    assert len([k for k in listed if k.endswith(".mp4")]) == 8 and len(listed) == 24
    assert not s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_multipart_upload_checksum_and_abort_of_incomplete_uploads(s3, tmp_path):
    sink = S3Sink(
        f"s3://{s3.bucket}/big",
        StorageOptions(endpoint_url=s3.endpoint, multipart_threshold_mb=5, multipart_chunk_mb=5),
    )
    payload = tmp_path / "big.bin"
    payload.write_bytes(bytes(range(256)) * (12 * 4096))  # 12 MiB: three parts
    stored = sink.put_file(payload, "clip.mp4")
    head = s3.client().head_object(Bucket=s3.bucket, Key="big/clip.mp4")
    assert head["ETag"].strip('"').endswith("-3")  # really multipart
    assert stored.sha256 == hashlib.sha256(payload.read_bytes()).hexdigest() == head["Metadata"]["sha256"]
    assert sink.matches("clip.mp4", stored.sha256) and not sink.matches("clip.mp4", "0" * 64)

    # A renderer killed mid-upload leaves an invisible multipart upload: the next submit aborts it.
    client = s3.client()
    upload = client.create_multipart_upload(Bucket=s3.bucket, Key="big/other.mp4")
    client.upload_part(
        Bucket=s3.bucket, Key="big/other.mp4", UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * (5 * 1024 * 1024)
    )
    assert "big/other.mp4" not in objects(s3, "big/")
    assert sink.abort_incomplete({"other.mp4"}) == 1
    assert not client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_missing_bucket_is_a_clear_input_error(s3, farm_home, write_manifest):
    manifest = write_manifest(JOB.replace("BUCKET", "no-such-bucket-here"))
    with pytest.raises(FarmError, match=r"bucket 'no-such-bucket-here' is not accessible"):
        api.plan(manifest)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("s3://bucket/a/../b", "'..' is not allowed in an output prefix"),
        ("s3://bucket/a b", "has characters that are unsafe in object keys"),
        ("s3://Bad_Bucket/x", "is not a valid bucket name"),
        ("ftp://host/x", "unsupported scheme"),
    ],
)
def test_outputs_that_could_escape_their_prefix_are_refused(write_manifest, farm_home, output, expected):
    path = write_manifest(f"campaign: x\nprompt: hi\noutput: '{output}'\n")
    with pytest.raises(FarmError) as info:
        load_manifest(path)
    assert f"{path}:3: output: " in str(info.value) and expected in str(info.value)


def test_catalog_on_s3_read_back_by_duckdb_and_pandas(ray_local, farm_home, write_manifest, s3, monkeypatch):
    location = f"s3://{s3.bucket}/catalog"
    monkeypatch.setenv("FARM_CATALOG", location)
    manifest = write_manifest(JOB.replace("BUCKET", s3.bucket).replace("[1, 2, 3, 4, 5, 6, 7, 8]", "[1, 2, 3]"))
    outcome = api.submit(manifest, workers=1)
    assert outcome.run.succeeded == 3 and outcome.catalog_root == location
    assert api.status(outcome.job_id).counts["succeeded"] == 3
    assert not (farm_home / "catalog").exists()

    fs, base = catalog_filesystem(location)

    class S3Arrow(ArrowFSWrapper):  # duckdb reads through any fsspec filesystem
        protocol = "s3"

    con = duckdb.connect()
    con.register_filesystem(S3Arrow(fs))
    count, total = con.execute(
        f"select count(*), sum(bytes) from read_parquet('{location}/attempts/*/*.parquet', hive_partitioning=true)"
        f" where job_id = '{outcome.job_id}' and status = 'succeeded'"
    ).fetchone()
    assert count == 3 and total > 0
    frame = pd.read_parquet(f"{base}/attempts", filesystem=fs)
    assert len(frame) == 3 and set(frame["status"]) == {"succeeded"}


def test_open_sink_refuses_unknown_schemes():
    with pytest.raises(FarmError, match="unsupported scheme"):
        open_sink(OutputTarget("gs://bucket/x"))
