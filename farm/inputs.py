"""Input files of conditioned clips: images (``image:``, ``last_image:``) and source videos
(``video:``), local paths or ``s3://bucket/key``.

Plan time: ``inspect_input`` checks an input (there, not too big, decodes, a usable size and frame
count) and hashes its bytes for the task id; ``InputInspector`` reads each file once. Render time:
``InputCache`` fetches an input once per node, by content hash, refusing one whose bytes changed
since planning; ``load_image`` / ``load_video`` read it fitted to the clip (crop, pad or resize).

Image or video is decided by content, not name: Pillow first (a fixed list of still-image formats),
then PyAV (a fixed list of containers: ffmpeg alone would read a text file as ANSI art). Pillow,
PyAV, numpy and boto3 are imported where used, so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from farm import config
from farm.config import MAX_INPUT_BYTES, MAX_INPUT_FRAMES, MAX_INPUT_SIDE, MIN_INPUT_SIDE
from farm.locks import exclusive
from farm.storage import StorageError, StorageOptions, s3_client, sha256_file, split_s3_uri
from farm.task import Fit

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

IMAGE = "image"
VIDEO = "video"
# Transparent pixels of an image (a cut-out packshot's background) are composited onto white, the
# usual backdrop of product shots; the bars ``fit: pad`` adds are black.
ALPHA_BACKGROUND = (255, 255, 255)
PAD_COLOR = (0, 0, 0)
# Still-image formats farm reads (Pillow's names; those this Pillow lacks are skipped). Many phones'
# JPEGs open as MPO, through JPEG.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
# Video containers farm reads (ffmpeg demuxer names, as in "mov,mp4,m4a,3gp,3g2,mj2").
VIDEO_CONTAINERS = frozenset(
    {"mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "ogg", "asf", "ivf", "nut", "mxf", "gif"}
)
_SUFFIX_KIND = dict.fromkeys((".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"), IMAGE)
_SUFFIX_KIND.update(dict.fromkeys((".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg"), VIDEO))
_SUFFIX = re.compile(r"^\.[a-z0-9]{1,8}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_MISSING_HINT = "check the path; relative paths are relative to the manifest"


class InputProblem(Exception):
    """An input file that cannot be used: ``message`` says what, ``hint`` how to fix it (one line
    each). The caller adds where (file:line: field)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


@dataclass(frozen=True)
class InputInfo:
    uri: str
    sha256: str
    kind: str  # IMAGE or VIDEO
    width: int
    height: int
    frames: int  # 1 for an image
    fps: float  # 0 for an image


# ----------------------------------------------------------------------------- inspecting


def inspect_input(uri: str, options: StorageOptions | None = None) -> InputInfo:
    """Check one input (local path or s3:// URI) and hash it; raise InputProblem if unusable."""
    if uri.startswith("s3://"):
        return _inspect_s3(uri, options or StorageOptions())
    path = Path(uri)
    _check_bytes(uri, _local_size(path, uri))
    return _inspect_file(path, uri, _local_sha256(path, uri))


class InputInspector:
    """``inspect_input`` once per URI: a manifest of 10,000 variants over 3 packshots reads 3
    files. A refused input is refused again from memory."""

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self._seen: dict[str, InputInfo | InputProblem] = {}

    def __call__(self, uri: str) -> InputInfo:
        if uri not in self._seen:
            try:
                self._seen[uri] = inspect_input(uri, self.options)
            except InputProblem as problem:
                self._seen[uri] = problem
        known = self._seen[uri]
        if isinstance(known, InputProblem):
            raise InputProblem(known.message, known.hint)
        return known


def sha256_of_uri(uri: str, options: StorageOptions | None = None) -> str:
    """The sha256 of an input's bytes as they are now (local file or S3 object)."""
    if not uri.startswith("s3://"):
        _local_size(Path(uri), uri)
        return _local_sha256(Path(uri), uri)
    bucket, key = split_input_uri(uri)
    return _s3_copy(s3_client(options or StorageOptions()), bucket, key, uri, None)


def _local_size(path: Path, uri: str) -> int:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise InputProblem(f"{uri} does not exist", _MISSING_HINT) from None
    except OSError as exc:
        raise InputProblem(f"{uri} cannot be read ({exc.strerror or exc})", "check the file's permissions") from None
    if path.is_dir():
        raise InputProblem(f"{uri} is a folder, not a file", "name an image or video file inside it")
    return stat.st_size


def _local_sha256(path: Path, uri: str) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise InputProblem(f"{uri} cannot be read ({exc.strerror or exc})", "check the file's permissions") from None


def _check_bytes(uri: str, size: int) -> None:
    if size == 0:
        raise InputProblem(f"{uri} is empty", "export the image or video again")
    if size > MAX_INPUT_BYTES:
        raise InputProblem(
            f"{uri} is {_human(size)}, more than the {_human(MAX_INPUT_BYTES)} an input may be",
            "use a smaller file (a clip needs far fewer pixels than a master)",
        )


def _human(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size:,} bytes"


def _check_sides(uri: str, width: int, height: int) -> None:
    if min(width, height) < MIN_INPUT_SIDE:
        raise InputProblem(
            f"{uri} is {width}×{height}, smaller than {MIN_INPUT_SIDE} px on a side",
            "use a larger image or video",
        )
    if max(width, height) > MAX_INPUT_SIDE:
        raise InputProblem(
            f"{uri} is {width}×{height}, larger than {MAX_INPUT_SIDE} px on a side",
            "scale it down first",
        )


def _inspect_file(path: Path, uri: str, digest: str) -> InputInfo:
    """Image or video, by content: Pillow first, then PyAV."""
    size = _image_size(path, uri)
    if size is not None:
        return InputInfo(uri, digest, IMAGE, size[0], size[1], 1, 0.0)
    video = _video_info(path, uri)
    if video is None:
        named = _SUFFIX_KIND.get(cache_suffix(uri))
        if named:
            raise InputProblem(f"{uri} is not a readable {named} (damaged, or not what its name says)", _EXPORT_HINT)
        raise InputProblem(
            f"{uri} is neither an image nor a video farm can read",
            f"use {', '.join(f.lower() for f in IMAGE_FORMATS[:4])} images or mp4/mov/mkv/webm videos",
        )
    width, height, frames, fps = video
    return InputInfo(uri, digest, VIDEO, width, height, frames, fps)


_EXPORT_HINT = "export it again (PNG or JPEG for images, mp4 for videos)"


def _image_size(path: Path, uri: str) -> tuple[int, int] | None:
    """(width, height) as displayed (EXIF orientation applied) of an image that decodes whole;
    None if Pillow does not take it for an image at all."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_image_formats()) as image:
                width, height = _oriented_size(image)
                _check_sides(uri, width, height)
                if image.format in ("JPEG", "MPO"):  # every byte is still decoded, at 1/8 the pixels
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError:
        raise InputProblem(
            f"{uri} declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels: too many to decode safely",
            f"scale it down (a clip needs far fewer; at most {MAX_INPUT_SIDE} px a side)",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise InputProblem(f"{uri} is a damaged image ({exc})", _EXPORT_HINT) from None
    return width, height


def _image_formats() -> list[str]:
    from PIL import Image

    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    orientation = image.getexif().get(0x0112, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else (image.width, image.height)


def _video_info(path: Path, uri: str) -> tuple[int, int, int, float] | None:
    """(width, height, frames, fps) of a video, its frames counted by decoding them; None if PyAV
    does not read it as a video container."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError):
        return None
    with container:
        if not VIDEO_CONTAINERS & set(container.format.name.split(",")):
            return None
        if not container.streams.video:
            raise InputProblem(f"{uri} has no video stream", "use a file with video in it")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: counting is decoding, on every core
        width, height, frames = _count_frames(container, stream, uri)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    _check_sides(uri, width, height)
    return width, height, frames, fps


def _count_frames(container: Any, stream: Any, uri: str) -> tuple[int, int, int]:
    """(width, height, frames): every frame decoded (not converted), up to MAX_INPUT_FRAMES."""
    import av

    count, width, height = 0, 0, 0
    try:
        for frame in container.decode(stream):
            if count == 0:
                width, height = frame.width, frame.height
            count += 1
            if count > MAX_INPUT_FRAMES:
                raise InputProblem(
                    f"{uri} has more than {MAX_INPUT_FRAMES:,} frames", "cut the part the clip needs from it"
                )
    except av.FFmpegError as exc:
        if count:
            raise InputProblem(f"{uri} is damaged after frame {count} ({exc})", _EXPORT_HINT) from None
    if count == 0:
        raise InputProblem(f"{uri} has no decodable video frames", _EXPORT_HINT)
    return width, height, count


# ----------------------------------------------------------------------------- S3


def split_input_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → (bucket, key). Keys are read only, so any key is accepted."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    try:
        split_s3_uri(f"s3://{bucket}")
    except StorageError as exc:
        raise InputProblem(exc.message, exc.hint or "") from None
    if not key or key.endswith("/") or any(ord(c) < 32 for c in key):
        raise InputProblem(f"{uri} does not name an object", "write s3://bucket/path/to/file")
    return bucket, key


def _s3_problem(exc: Exception, uri: str) -> InputProblem:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in ("404", "NoSuchKey", "NotFound"):
            return InputProblem(f"{uri} does not exist", "check the bucket and key")
        if code == "NoSuchBucket":
            return InputProblem(f"{uri}: there is no such bucket", "check the bucket's name")
        return InputProblem(f"{uri} cannot be read ({code})", "check the credentials' permissions on the bucket")
    return InputProblem(
        f"{uri} cannot be read: S3 is unreachable ({exc})",
        "check storage.endpoint_url / AWS_ENDPOINT_URL and that the server runs",
    )


def _s3_size(client: Any, bucket: str, key: str, uri: str) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except (ClientError, BotoCoreError) as exc:
        raise _s3_problem(exc, uri) from None


def _s3_copy(client: Any, bucket: str, key: str, uri: str, out: IO[bytes] | None) -> str:
    """The object's sha256, its bytes written to ``out`` on the way; refused past MAX_INPUT_BYTES."""
    from botocore.exceptions import BotoCoreError, ClientError

    digest, total = hashlib.sha256(), 0
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(_CHUNK):
            total += len(chunk)
            _check_bytes(uri, total)
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    except (ClientError, BotoCoreError) as exc:
        raise _s3_problem(exc, uri) from None
    return digest.hexdigest()


def _inspect_s3(uri: str, options: StorageOptions) -> InputInfo:
    bucket, key = split_input_uri(uri)
    client = s3_client(options)
    _check_bytes(uri, _s3_size(client, bucket, key, uri))
    with tempfile.TemporaryDirectory(prefix="farm-input-") as folder:
        local = Path(folder) / f"input{cache_suffix(uri)}"
        with local.open("wb") as fh:
            digest = _s3_copy(client, bucket, key, uri, fh)
        return _inspect_file(local, uri, digest)


# ----------------------------------------------------------------------------- the node's cache


def cache_suffix(uri: str) -> str:
    """The input's extension, lower-cased, if it is a plain one (readers go by content anyway)."""
    suffix = Path(uri.rsplit("/", 1)[-1]).suffix.lower()
    return suffix if _SUFFIX.match(suffix) else ""


class InputCache:
    """This node's inputs, by content hash: fetched once, shared by every renderer process on the
    node (a file lock per input; the file appears whole, by rename, only once its hash matches)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else config.input_cache_dir()
        self.hits = 0
        self.misses = 0

    def path_for(self, uri: str, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / f"{sha256}{cache_suffix(uri)}"

    def fetch(self, uri: str, sha256: str, options: StorageOptions | None = None) -> Path:
        """A local file with the input's planned bytes; read from the source only on a miss."""
        target = self.path_for(uri, sha256)
        if target.is_file():
            self.hits += 1
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(target.parent / f".{sha256}.lock"):
            if target.is_file():  # another process on this node fetched it while we waited
                self.hits += 1
                return target
            self.misses += 1
            self._download(uri, sha256, target, options or StorageOptions())
        return target

    def _download(self, uri: str, sha256: str, target: Path, options: StorageOptions) -> None:
        temp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with temp.open("wb") as fh:
                digest = _copy_source(uri, options, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if digest != sha256:
                raise InputProblem(
                    f"{uri} changed since the job was planned (sha256 {sha256[:12]}…≠{digest[:12]}…)",
                    "submit again to plan with the new file",
                )
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)


def _copy_source(uri: str, options: StorageOptions, out: IO[bytes]) -> str:
    """Copy an input's bytes (local file or S3 object) to ``out``; their sha256."""
    if uri.startswith("s3://"):
        bucket, key = split_input_uri(uri)
        return _s3_copy(s3_client(options), bucket, key, uri, out)
    path = Path(uri)
    _local_size(path, uri)
    digest, total = hashlib.sha256(), 0
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            total += len(chunk)
            _check_bytes(uri, total)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- fitting and loading


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB: transparency composited onto ALPHA_BACKGROUND, 16-bit grey scaled to 8 bits."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):  # 16-bit greyscale PNGs open as I;16 / I
        import numpy as np

        grey = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, width: int, height: int, fit: Fit | str) -> Image.Image:
    """The image as RGB, exactly ``width``×``height``: ``crop`` scales to cover and cuts the centre,
    ``pad`` scales to fit inside with black bars, ``resize`` stretches (LANCZOS throughout)."""
    from PIL import Image

    image = to_rgb(image)
    if image.size == (width, height):
        return image
    scaled = image.resize(scaled_size(image.width, image.height, width, height, fit), Image.Resampling.LANCZOS)
    return _place(scaled, width, height)


def scaled_size(in_width: int, in_height: int, width: int, height: int, fit: Fit | str) -> tuple[int, int]:
    """The size an input is scaled to before it is centre-cropped (crop) or padded (pad) to
    ``width``×``height``; for resize, that size itself."""
    fit = Fit(fit)
    if fit is Fit.RESIZE:
        return width, height
    if fit is Fit.CROP:
        scale = max(width / in_width, height / in_height)
        return max(width, round(in_width * scale)), max(height, round(in_height * scale))
    scale = min(width / in_width, height / in_height)
    return min(width, max(1, round(in_width * scale))), min(height, max(1, round(in_height * scale)))


def _place(scaled: Image.Image, width: int, height: int) -> Image.Image:
    """A scaled image centred in ``width``×``height``: its overhang cut, or black bars added."""
    from PIL import Image

    if scaled.size == (width, height):
        return scaled
    if scaled.width >= width and scaled.height >= height:
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height), PAD_COLOR)
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas


def fit_frames(frames: np.ndarray, width: int, height: int, fit: Fit | str) -> np.ndarray:
    """(T, H, W, 3) uint8 frames fitted as ``fit_image`` fits each: (T, height, width, 3) uint8."""
    import numpy as np
    from PIL import Image

    if frames.shape[1:3] == (height, width):
        return frames
    if len(frames) == 0:
        return np.zeros((0, height, width, 3), np.uint8)
    return np.stack([np.asarray(fit_image(Image.fromarray(f), width, height, fit)) for f in frames])


def load_image(path: Path, width: int, height: int, fit: Fit | str) -> Image.Image:
    """An input image as RGB, EXIF orientation applied, fitted to ``width``×``height``."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_image_formats()) as image:
                if image.format in ("JPEG", "MPO"):  # decode at the smallest scale that still covers
                    side = max(width, height)
                    image.draft("RGB", (side, side))
                upright = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise InputProblem(f"{path} does not exist", _MISSING_HINT) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError) as exc:
        raise InputProblem(f"{path} is not a readable image ({exc})", _EXPORT_HINT) from None
    return fit_image(upright, width, height, fit)


def load_video(path: Path, width: int, height: int, frames: int, fit: Fit | str) -> list[Image.Image]:
    """The first ``frames`` frames of a video, RGB, each fitted to ``width``×``height`` (scaled by
    ffmpeg's swscale, Lanczos: several times faster than Pillow on full-HD frames)."""
    import av

    fitted: list[Image.Image] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                size = scaled_size(frame.width, frame.height, width, height, fit)
                rgb = frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="LANCZOS")
                fitted.append(_place(rgb.to_image(), width, height))
                if len(fitted) >= frames:
                    break
    except (av.FFmpegError, OSError, IndexError) as exc:
        if not fitted:
            raise InputProblem(f"{path} is not a readable video ({exc})", _EXPORT_HINT) from None
    if len(fitted) < frames:
        raise InputProblem(
            f"{path} has {len(fitted)} frames; the clip needs {frames}",
            "use a longer source video, or fewer frames:",
        )
    return fitted


# ----------------------------------------------------------------------------- examples


def synthetic_clip(
    path: Path, frames: int = 17, width: int = 64, height: int = 64, fps: int = 8, seed: int = 0
) -> None:
    """A deterministic short "street" (sky, road, cars driving across, a walker) encoded as H.264
    mp4: the example source video of video-to-video, made instead of committed. Same arguments,
    same bytes. ``width`` and ``height`` must be even."""
    import numpy as np

    from farm.video import encode_mp4

    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    horizon = 0.55
    sky = np.array([90, 150, 230], np.float32) * (1 - ys) + np.array([250, 200, 150], np.float32) * ys
    road = np.array([70, 70, 78], np.float32) + 40 * (ys - horizon)
    background = np.where(ys < horizon, sky, road) * np.ones((1, width, 1), np.float32)
    for left in range(0, width, max(4, width // 7)):  # a skyline
        top = int(height * rng.uniform(0.2, 0.45))
        background[top : int(height * horizon), left : left + max(3, width // 9)] = rng.integers(80, 170, 3)
    lane = (np.arange(width) // max(1, width // 8)) % 2 == 0
    mark_row = int(height * 0.8)
    background[mark_row : mark_row + max(1, height // 32), lane] = (235, 225, 120)
    cars = [
        (rng.uniform(0, width), rng.uniform(1.5, 4.0) * (1 if i % 2 == 0 else -1), rng.integers(40, 255, 3), i)
        for i in range(3)
    ]
    clip = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        frame = background.copy()
        for x0, speed, colour, i in cars:
            _draw_car(frame, (x0 + speed * t) % (width + width // 4) - width // 8, horizon + 0.1 * (i + 1), colour)
        walker_x = int((width * 0.1 + t * width / 48) % width)
        frame[int(height * 0.45) : int(height * 0.6), walker_x : walker_x + max(1, width // 32)] = (30, 30, 40)
        clip[t] = frame.clip(0, 255).astype(np.uint8)
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        encode_mp4(clip, fps, temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _draw_car(frame: np.ndarray, x: float, row: float, colour: np.ndarray) -> None:
    height, width, _ = frame.shape
    top, left = int(row * height), int(x)
    car_h, car_w = max(2, height // 10), max(4, width // 6)
    frame[max(0, top) : top + car_h, max(0, left) : max(0, left + car_w)] = colour
    wheels = (top + car_h, top + car_h + max(1, height // 32))
    for wx in (left + car_w // 5, left + car_w - car_w // 5):
        frame[wheels[0] : wheels[1], max(0, wx - 1) : max(0, wx + 1)] = (15, 15, 15)
