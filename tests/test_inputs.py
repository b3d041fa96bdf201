"""Input files (farm/inputs.py): inspection and its refusals, hashing, fitting, loading, the node's
cache (local and S3), and the example inputs under manifests/inputs/."""

from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import farm.inputs
from farm.inputs import (
    InputCache,
    InputInfo,
    InputInspector,
    InputProblem,
    fit_frames,
    fit_image,
    inspect_input,
    load_image,
    load_video,
    sha256_of_uri,
    synthetic_clip,
)
from farm.storage import StorageOptions
from farm.task import Fit
from farm.video import decode_frames, probe

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "manifests" / "inputs"
PICTURES = {
    "packshots/bottle.png": (128, 128),
    "packshots/sneaker.png": (128, 128),
    "packshots/watch.png": (128, 128),
    "keyframes/open.png": (128, 72),
    "keyframes/close.png": (128, 72),
}
RED, WHITE, BLUE = (255, 0, 0), (255, 255, 255), (0, 0, 255)


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "street.mp4"
    synthetic_clip(path)  # 17 frames, 64×64, 8 fps
    return path


def png(path: Path, size: tuple[int, int] = (64, 48), color=(10, 120, 200), mode: str = "RGB") -> Path:
    Image.new(mode, size, color).save(path, format="PNG")
    return path


def bands(size: tuple[int, int] = (256, 128)) -> Image.Image:
    """A wide picture: red left quarter, white middle half, blue right quarter."""
    width, height = size
    array = np.full((height, width, 3), 255, np.uint8)
    array[:, : width // 4] = RED
    array[:, width - width // 4 :] = BLUE
    return Image.fromarray(array)


def refused(path: Path | str) -> InputProblem:
    with pytest.raises(InputProblem) as caught:
        inspect_input(str(path))
    assert "\n" not in caught.value.message and "\n" not in caught.value.hint
    return caught.value


# ----------------------------------------------------------------------------- refusals


def test_missing_file_and_folder_are_refused(tmp_path):
    missing = refused(tmp_path / "nowhere.png")
    assert missing.message == f"{tmp_path / 'nowhere.png'} does not exist"
    assert "relative to the manifest" in missing.hint
    assert refused(tmp_path).message == f"{tmp_path} is a folder, not a file"
    (tmp_path / "empty.png").touch()
    assert refused(tmp_path / "empty.png").message.endswith("empty.png is empty")


def test_text_file_is_neither_image_nor_video(tmp_path):
    # ffmpeg alone reads a .txt as ANSI art (a "video" of 3 frames): the container list refuses it.
    text = tmp_path / "x.txt"
    text.write_text("a list of shots\n" * 50)
    problem = refused(text)
    assert problem.message == f"{text} is neither an image nor a video farm can read"
    assert "png" in problem.hint and "mp4" in problem.hint


def test_image_too_small_or_too_large_per_side(tmp_path, monkeypatch):
    problem = refused(png(tmp_path / "tiny.png", (8, 40)))
    assert problem.message.endswith("tiny.png is 8×40, smaller than 16 px on a side")
    monkeypatch.setattr(farm.inputs, "MAX_INPUT_SIDE", 100)
    assert refused(png(tmp_path / "wide.png", (128, 32))).message.endswith("is 128×32, larger than 100 px on a side")


def test_damaged_images_are_refused(tmp_path):
    good = png(tmp_path / "good.png", (64, 64), mode="RGB", color=(1, 2, 3)).read_bytes()
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy)
    (tmp_path / "truncated.png").write_bytes(noisy.read_bytes()[: noisy.stat().st_size // 2])
    problem = refused(tmp_path / "truncated.png")
    assert "truncated.png is a damaged image (image file is truncated)" in problem.message
    (tmp_path / "garbage.png").write_bytes(good[:8] + bytes(range(256)) * 4)
    assert refused(tmp_path / "garbage.png").message.endswith(
        "garbage.png is not a readable image (damaged, or not what its name says)"
    )
    (tmp_path / "garbage.mp4").write_bytes(bytes(range(256)) * 8)
    assert "garbage.mp4 is not a readable video" in refused(tmp_path / "garbage.mp4").message


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width``×``height`` and holds no pixels: what a decompression bomb shows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    bomb = png_header(tmp_path / "bomb.png", 15000, 15000)  # within MAX_INPUT_SIDE, 225 Mpx
    problem = refused(bomb)
    assert problem.message.endswith("bomb.png declares more than 178,956,970 pixels: too many to decode safely")
    assert "scale it down" in problem.hint


def test_video_without_decodable_frames_or_video_stream(tmp_path, street):
    data = bytearray(street.read_bytes())
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 : at - 4 + size] = bytes(size - 8)  # every frame's bytes zeroed
    (tmp_path / "blank.mp4").write_bytes(data)
    assert refused(tmp_path / "blank.mp4").message.endswith("blank.mp4 has no decodable video frames")

    import av

    with av.open(str(tmp_path / "nothing.mp4"), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()  # a header, and a stream that never gets a packet
    assert refused(tmp_path / "nothing.mp4").message.endswith("nothing.mp4 has no video stream")


def test_oversize_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = png(tmp_path / "big.png", (64, 64))
    monkeypatch.setattr(farm.inputs, "MAX_INPUT_BYTES", 50)

    def unread(*_):
        raise AssertionError("read")

    monkeypatch.setattr(farm.inputs, "sha256_file", unread)
    monkeypatch.setattr(Image, "open", unread)
    problem = refused(path)
    assert problem.message == f"{path} is {path.stat().st_size} bytes, more than the 50 bytes an input may be"


def test_video_with_too_many_frames_is_refused(street, monkeypatch):
    monkeypatch.setattr(farm.inputs, "MAX_INPUT_FRAMES", 5)
    assert refused(street).message.endswith("street.mp4 has more than 5 frames")


# ----------------------------------------------------------------------------- what inspection finds


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_image_info(tmp_path, fmt):
    path = tmp_path / f"shot.{fmt.lower()}"
    bands((96, 48)).save(path, format=fmt)
    info = inspect_input(str(path))
    assert info == InputInfo(str(path), hashlib.sha256(path.read_bytes()).hexdigest(), "image", 96, 48, 1, 0.0)


def test_kind_is_decided_by_content_not_extension(tmp_path, street):
    shutil.copy(street, tmp_path / "clip.png")
    png(tmp_path / "still.mp4")
    assert inspect_input(str(tmp_path / "clip.png")).kind == "video"
    assert inspect_input(str(tmp_path / "still.mp4")).kind == "image"


def test_video_info_counts_decoded_frames(street, tmp_path):
    info = inspect_input(str(street))
    assert (info.kind, info.width, info.height, info.frames, info.fps) == ("video", 64, 64, 17, 8.0)
    assert info.sha256 == hashlib.sha256(street.read_bytes()).hexdigest()
    assert info.frames == probe(street).frames
    one = tmp_path / "one.mp4"
    synthetic_clip(one, frames=1, width=32, height=16 * 2)
    assert inspect_input(str(one)).frames == 1


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not on PATH")
def test_frame_count_matches_ffprobe(street):
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=nb_read_frames,width,height", "-of", "csv=p=0", str(street)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    width, height, frames = (int(v) for v in out.split(","))
    info = inspect_input(str(street))
    assert (info.width, info.height, info.frames) == (width, height, frames)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise
    bands((64, 32)).save(path, exif=exif, quality=95)
    info = inspect_input(str(path))
    assert (info.width, info.height) == (32, 64)
    upright = np.asarray(load_image(path, 32, 64, Fit.RESIZE)).astype(int)
    assert upright[2, 16, 0] > 200 and upright[2, 16, 2] < 60  # the red band is on top now
    assert upright[61, 16, 2] > 200 and upright[61, 16, 0] < 60  # the blue one at the bottom


def test_sha256_follows_content_not_path(tmp_path):
    first = png(tmp_path / "a.png", color=(1, 2, 3))
    second = tmp_path / "copy" / "b.png"
    second.parent.mkdir()
    shutil.copy(first, second)
    a, b = inspect_input(str(first)), inspect_input(str(second))
    assert a.sha256 == b.sha256 == hashlib.sha256(first.read_bytes()).hexdigest() == sha256_of_uri(str(first))
    png(second, color=(1, 2, 4))
    assert inspect_input(str(second)).sha256 != a.sha256


def test_inspector_reads_each_input_once(monkeypatch, tmp_path):
    calls: list[str] = []
    real = farm.inputs.inspect_input

    def counting(uri, options=None):
        calls.append(uri)
        return real(uri, options)

    monkeypatch.setattr(farm.inputs, "inspect_input", counting)
    inspector = InputInspector(StorageOptions())
    shots = [str(EXAMPLES / name) for name in PICTURES if name.startswith("packshots/")]
    infos = [inspector(shots[i % 3]) for i in range(10_000)]
    assert sorted(calls) == sorted(shots) and {i.width for i in infos} == {128}
    for _ in range(3):
        with pytest.raises(InputProblem, match="does not exist"):
            inspector(str(tmp_path / "gone.png"))
    assert len(calls) == 4


# ----------------------------------------------------------------------------- fitting and loading


@pytest.mark.parametrize("fit", list(Fit))
@pytest.mark.parametrize("size", [(64, 64), (50, 30), (30, 90), (256, 128)])
def test_fit_gives_exact_size_in_rgb(fit, size):
    for source in (bands(), bands().convert("L"), bands().convert("RGBA"), bands().convert("P")):
        fitted = fit_image(source, *size, fit)
        assert fitted.size == size and fitted.mode == "RGB"


def looks(image: Image.Image) -> dict[str, bool]:
    array = np.asarray(image).astype(int)
    r, g, b = array[..., 0], array[..., 1], array[..., 2]
    return {
        "red": bool(((r > 200) & (g < 60) & (b < 60)).any()),
        "blue": bool(((b > 200) & (r < 60) & (g < 60)).any()),
        "black": bool(((r < 20) & (g < 20) & (b < 20)).any()),
    }


def test_fit_modes_look_as_named():
    crop = fit_image(bands(), 64, 64, Fit.CROP)  # the middle half: white, nothing else
    assert looks(crop) == {"red": False, "blue": False, "black": False}
    pad = np.asarray(fit_image(bands(), 64, 64, "pad"))
    assert not pad[:16].any() and not pad[48:].any()  # black bars above and below, 16 rows each
    assert looks(Image.fromarray(pad[16:48])) == {"red": True, "blue": True, "black": False}
    resize = fit_image(bands(), 64, 64, Fit.RESIZE)  # everything, squeezed
    assert looks(resize) == {"red": True, "blue": True, "black": False}
    assert np.asarray(resize)[:, :12].mean(axis=(0, 1)).round().tolist() == [255, 0, 0]


def test_fit_frames():
    frames = np.stack([np.asarray(bands((96, 48)))] * 3)
    for fit in Fit:
        fitted = fit_frames(frames, 32, 32, fit)
        assert fitted.shape == (3, 32, 32, 3) and fitted.dtype == np.uint8
    assert not fit_frames(frames, 32, 32, Fit.PAD)[:, :8].any()
    assert fit_frames(frames, 96, 48, Fit.CROP) is frames


def test_load_image_puts_transparency_on_white(tmp_path):
    cutout = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    cutout.paste((200, 30, 30, 255), (16, 16, 48, 48))
    cutout.save(tmp_path / "cutout.png")
    loaded = np.asarray(load_image(tmp_path / "cutout.png", 32, 32, Fit.CROP))
    assert loaded.shape == (32, 32, 3)
    assert loaded[0, 0].tolist() == [255, 255, 255] and loaded[16, 16].tolist() == [200, 30, 30]


def test_load_video_fits_the_first_frames(street):
    loaded = load_video(street, 48, 32, 9, Fit.CROP)
    assert len(loaded) == 9 and all(im.size == (48, 32) and im.mode == "RGB" for im in loaded)
    expected = fit_frames(decode_frames(street, limit=9), 48, 32, Fit.CROP)
    assert np.abs(np.stack([np.asarray(im) for im in loaded]).astype(int) - expected).mean() < 6
    with pytest.raises(InputProblem, match="has 17 frames; the clip needs 20"):
        load_video(street, 48, 32, 20, Fit.CROP)


# ----------------------------------------------------------------------------- the node's cache


def test_cache_fetches_once_and_serves_without_the_source(tmp_path):
    source = png(tmp_path / "shot.png")
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = InputCache(tmp_path / "cache")
    path = cache.fetch(str(source), sha)
    assert path == tmp_path / "cache" / sha[:2] / f"{sha}.png" and path.read_bytes() == source.read_bytes()
    source.unlink()  # a hit does not read the source
    assert cache.fetch(str(source), sha) == path and (cache.hits, cache.misses) == (1, 1)
    another_process = InputCache(tmp_path / "cache")
    assert another_process.fetch(str(source), sha) == path and another_process.hits == 1
    with pytest.raises(InputProblem, match="does not exist"):
        InputCache(tmp_path / "other").fetch(str(source), sha)


def test_cache_refuses_a_source_changed_since_planning(tmp_path, farm_home):
    source = png(tmp_path / "shot.png", color=(1, 1, 1))
    planned = hashlib.sha256(source.read_bytes()).hexdigest()
    png(source, color=(2, 2, 2))
    cache = InputCache()  # $FARM_HOME/cache/inputs
    assert cache.root == farm_home / "cache" / "inputs"
    with pytest.raises(InputProblem) as caught:
        cache.fetch(str(source), planned)
    now = hashlib.sha256(source.read_bytes()).hexdigest()
    assert caught.value.message == f"{source} changed since the job was planned (sha256 {planned[:12]}…≠{now[:12]}…)"
    assert caught.value.hint == "submit again to plan with the new file"
    assert [p.name for p in cache.root.rglob("*") if p.is_file()] == [f".{planned}.lock"]  # no temp, no file


def _fetch_in_process(root: str, uri: str, sha: str, barrier, results) -> None:
    barrier.wait()
    cache = InputCache(Path(root))
    path = cache.fetch(uri, sha)
    results.put((str(path), cache.hits, cache.misses, hashlib.sha256(path.read_bytes()).hexdigest()))


def test_cache_is_safe_with_two_processes_fetching_at_once(tmp_path):
    source = tmp_path / "clip.bin"
    source.write_bytes(np.random.default_rng(0).bytes(8 * 2**20))
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    args = (str(tmp_path / "cache"), str(source), sha, barrier, results)
    workers = [context.Process(target=_fetch_in_process, args=args) for _ in range(2)]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert {g[0] for g in got} == {str(tmp_path / "cache" / sha[:2] / f"{sha}.bin")}
    assert sorted((g[1], g[2]) for g in got) == [(0, 1), (1, 0)]  # one read the source, one waited
    assert {g[3] for g in got} == {sha}
    assert not [p for p in (tmp_path / "cache").rglob("*tmp*")]


# ----------------------------------------------------------------------------- S3


def test_s3_input_is_inspected_and_cached(s3, tmp_path):
    client, options = s3.client(), StorageOptions(endpoint_url=s3.endpoint)
    shot = EXAMPLES / "packshots" / "bottle.png"
    client.upload_file(str(shot), s3.bucket, "packshots/bottle.png")
    uri = f"s3://{s3.bucket}/packshots/bottle.png"
    info = inspect_input(uri, options)
    assert info == InputInfo(uri, hashlib.sha256(shot.read_bytes()).hexdigest(), "image", 128, 128, 1, 0.0)
    assert InputInspector(options)(uri) == info and sha256_of_uri(uri, options) == info.sha256
    with pytest.raises(InputProblem, match="does not exist"):
        inspect_input(f"s3://{s3.bucket}/packshots/missing.png", options)
    cache = InputCache(tmp_path / "cache")
    path = cache.fetch(uri, info.sha256, options)
    assert path.name == f"{info.sha256}.png" and path.read_bytes() == shot.read_bytes()
    client.put_object(Bucket=s3.bucket, Key="packshots/bottle.png", Body=b"not the planned bytes")
    assert cache.fetch(uri, info.sha256, options) == path  # cached: the source is not read again
    with pytest.raises(InputProblem, match="changed since the job was planned"):
        InputCache(tmp_path / "fresh").fetch(uri, info.sha256, options)


def test_s3_video_input(s3, street):
    options = StorageOptions(endpoint_url=s3.endpoint)
    s3.client().upload_file(str(street), s3.bucket, "sources/street.mp4")
    info = inspect_input(f"s3://{s3.bucket}/sources/street.mp4", options)
    assert (info.kind, info.frames, info.width, info.sha256) == ("video", 17, 64, inspect_input(str(street)).sha256)


# ----------------------------------------------------------------------------- examples


def load_script():
    spec = importlib.util.spec_from_file_location("make_example_inputs", REPO / "scripts" / "make_example_inputs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_example_pictures(tmp_path):
    script = load_script()
    script.main(["--out", str(tmp_path), "--images"])
    for name, size in PICTURES.items():
        committed = EXAMPLES / name
        assert committed.stat().st_size < 50_000
        info = inspect_input(str(committed))
        assert (info.kind, (info.width, info.height)) == ("image", size)
        drawn = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        assert np.abs(drawn - np.asarray(Image.open(committed).convert("RGB"))).mean() < 1  # redrawn alike


def test_example_street_clip_is_made_once_and_deterministic(tmp_path):
    script = load_script()
    script.main(["--out", str(tmp_path)])
    street = tmp_path / "street.mp4"
    made = street.stat().st_mtime_ns
    script.main(["--out", str(tmp_path)])
    assert street.stat().st_mtime_ns == made  # not made again
    info = inspect_input(str(street))
    assert (info.kind, info.width, info.height, info.frames, info.fps) == ("video", 64, 64, 17, 8.0)
    synthetic_clip(tmp_path / "again.mp4")
    assert (tmp_path / "again.mp4").read_bytes() == street.read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))


def test_importing_farm_inputs_is_cheap():
    code = "import sys, farm.inputs; print([m for m in ('PIL', 'av', 'boto3', 'numpy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
