"""What verifying "done" costs on resume: 10,000 done tasks, outputs on local disk and on S3
(SeaweedFS, started here as the tests start it).

Each done task's clip must still be in the output with the size the catalog recorded: a stat per
clip locally; on S3 one listing of the prefix (1,000 keys a request) from ``S3_LIST_FROM`` names
up, else HEADs, ``S3_HEAD_THREADS`` at a time. Measured, median of ``--repeat`` runs:

- ``catalog_read_s``: reading the catalog's rows and picking each task's valid success (what the
  done-check cost before verification);
- ``verified_s``: the same plus the check of every clip (``Catalog.check_done``);
- ``heads_s`` (S3): the check by HEADs instead of the listing, for comparison;
- ``resubmit_s`` / ``resubmit_unverified_s``: ``api.submit`` of the finished 10,000-task job,
  in-process, start to "nothing to render", with the verification and with it stubbed out;
- ``farm_verify_s``: ``farm verify``'s full check (clip, poster, marker), sizes only.

No Ray and no rendering: the catalog (one job, batches of 32 rows as a controller writes them) and
the output files are written by this script. Results: ``bench/results/verify-<timestamp>.json``.

    .venv/bin/python bench/verify.py            # ~2 minutes on 2 cores (the S3 upload is most of it)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLIP = os.urandom(2500)  # about a tiny-model clip
BATCH = 32


def median_time(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return round(statistics.median(runs), 4)


def manifest(folder: Path, tasks: int, output: str) -> Path:
    path = folder / "m10k.yaml"
    path.write_text(
        'campaign: verify10k\nmodel: "fake:noop"\nprompt: "clip {n}"\n'
        f"axes:\n  n: [{','.join(str(i) for i in range(tasks))}]\noutput: {output}\n"
    )
    return path


def record_done(catalog, tasks, output: str, put, full: bool) -> None:
    """A finished job as a controller leaves it: task list, succeeded rows in batches of 32, and
    each task's clip in the output (``put(name, bytes)``; with ``full`` its poster and marker too)."""
    from farm.records import JobRecord, attempt_row
    from farm.task import AttemptStatus, Result

    now = time.time()
    results = []
    for t in tasks:
        uri = f"{output.rstrip('/')}/{t.task_id}.mp4"
        results.append(Result(t.task_id, 1, AttemptStatus.SUCCEEDED, uri, uri[:-4] + ".jpg", len(CLIP), "0" * 64,
                              started_at=now, finished_at=now, poster_bytes=len(CLIP)))  # fmt: skip

    def put_all(t) -> None:
        put(f"{t.task_id}.mp4", CLIP)
        if full:
            put(f"{t.task_id}.jpg", CLIP)
            put(f"{t.task_id}.json", json.dumps({"task_id": t.task_id, "sha256": "0" * 64}).encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put_all, tasks))
    job_id = "verify10k-bench"
    with catalog.writer(job_id, batch_rows=BATCH, batch_seconds=1e9) as writer:
        for t, r in zip(tasks, results, strict=True):
            writer.add(attempt_row(t, r, output, final=True))
    catalog.record_tasks(job_id, tasks)
    ids = tuple(t.task_id for t in tasks)
    catalog.record_job(
        JobRecord(job_id, "verify10k", datetime.now(UTC), "bench", "h", "m", "", "", "fake:noop", output, 1, ids, "0")
    )


def measure(catalog, tasks, target, mpath: Path, repeat: int, s3: bool) -> dict:
    from farm import api, storage
    from farm import catalog as catalog_module
    from farm.catalog import _DONE_COLUMNS

    ids = [t.task_id for t in tasks]
    out: dict = {}
    out["catalog_read_s"] = median_time(lambda: catalog.done_rows(ids, target.uri, _DONE_COLUMNS), repeat)
    check = catalog.check_done(ids, target)
    assert len(check.done) == len(ids) and not check.problems, check.problems
    out["verified_s"] = median_time(lambda: catalog.check_done(ids, target), repeat)
    if s3:
        saved = storage.S3_LIST_FROM
        storage.S3_LIST_FROM = 10**9  # force HEADs
        try:
            out["heads_s"] = median_time(lambda: catalog.check_done(ids, target), max(1, repeat // 2))
        finally:
            storage.S3_LIST_FROM = saved
    out["resubmit_s"] = median_time(lambda: _resubmit(api, mpath, len(ids)), repeat)
    real = catalog_module.check_outputs
    catalog_module.check_outputs = lambda *a, **k: []
    try:
        out["resubmit_unverified_s"] = median_time(lambda: _resubmit(api, mpath, len(ids)), repeat)
    finally:
        catalog_module.check_outputs = real
    out["verify_overhead_s"] = round(out["resubmit_s"] - out["resubmit_unverified_s"], 4)
    return out


def _resubmit(api, mpath: Path, expected: int) -> None:
    outcome = api.submit(mpath)
    assert outcome.run is None and len(outcome.plan.done) == expected, "the job was not found finished"


def local_case(tmp: Path, tasks_n: int, repeat: int) -> dict:
    from farm.catalog import Catalog
    from farm.expand import expand
    from farm.manifest import load_manifest
    from farm.storage import OutputTarget

    out_dir = tmp / "out"
    out_dir.mkdir()
    mpath = manifest(tmp, tasks_n, str(out_dir))
    tasks = expand(load_manifest(mpath)).tasks
    catalog = Catalog(tmp / "home" / "catalog")
    record_done(catalog, tasks, str(out_dir), lambda name, data: (out_dir / name).write_bytes(data), full=True)
    result = measure(catalog, tasks, OutputTarget(str(out_dir)), mpath, repeat, s3=False)
    from farm import api

    report = api.verify("verify10k-bench")  # clip + poster + marker
    assert not report.problems, report.problems[:3]
    result["farm_verify_s"] = median_time(lambda: api.verify("verify10k-bench"), 1)
    return result


def s3_case(tmp: Path, tasks_n: int, repeat: int) -> dict:
    from farm.catalog import Catalog
    from farm.expand import expand
    from farm.manifest import load_manifest
    from farm.storage import OutputTarget
    from tests.s3server import SeaweedS3

    server = SeaweedS3(tmp / "seaweedfs")
    server.start()
    try:
        os.environ.update(server.env)
        client = server.client()
        client.create_bucket(Bucket="verify-bench")
        output = "s3://verify-bench/clips"
        mpath = manifest(tmp, tasks_n, output)
        tasks = expand(load_manifest(mpath)).tasks
        catalog = Catalog(tmp / "home" / "catalog")
        started = time.perf_counter()
        record_done(
            catalog,
            tasks,
            output,
            lambda name, data: client.put_object(Bucket="verify-bench", Key=f"clips/{name}", Body=data),
            full=False,
        )
        result = {"upload_s": round(time.perf_counter() - started, 1)}
        result.update(measure(catalog, tasks, OutputTarget(output), mpath, repeat, s3=True))
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args()
    results: dict = {
        "tasks": opts.tasks,
        "repeat": opts.repeat,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
    }
    for case in ("local", "s3"):
        with tempfile.TemporaryDirectory(prefix=f"farm-bench-verify-{case}-") as folder:
            tmp = Path(folder)
            os.environ["FARM_HOME"] = str(tmp / "home")
            os.environ.pop("FARM_CATALOG", None)
            results[case] = (local_case if case == "local" else s3_case)(tmp, opts.tasks, opts.repeat)
            print(case, results[case], flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    out = REPO / "bench" / "results" / f"verify-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
