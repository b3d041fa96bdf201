"""What a combination is generated from, resolved and checked at the edge: the ``mode:`` and the
inputs (``image:``, ``last_image:``, ``video:``) of each task, templates filled per variant, paths
resolved against the manifest's folder, every file inspected (it exists, decodes, has a usable
size and frame count) and hashed. The content hashes go into task ids; the paths do not.

Pure but for the injected ``inspect`` (``farm.inputs.InputInspector`` in production: one read
per distinct URI, however many variants use it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.manifest import ManifestFile, Where, error_at
from farm.models import effective_steps, mode_identity, model_modes
from farm.task import Conditioning, Fit, InputRef, InputRole, Mode, RenderSettings
from farm.template import Template, TemplateError, parse_template

if TYPE_CHECKING:
    from farm.inputs import InputInfo

INPUT_KEYS = ("image", "last_image", "video")
_KIND_OF_KEY = {"image": "image", "last_image": "image", "video": "video"}


@dataclass(frozen=True)
class Resolved:
    """A combination's conditioning, ready for its tasks."""

    conditioning: Conditioning  # input keys hold resolved URIs
    inputs: tuple[InputRef, ...]
    identity: str  # the model identity hashed into the task id for this mode
    hashed_inputs: tuple[str, ...]  # what of the inputs the task id hashes: their sha256
    hashed: dict[str, Any] | None  # other conditioning values the task id hashes

    @property
    def key(self) -> tuple[Any, ...]:
        """What of it tells tasks apart (``expand.count``)."""
        return (self.identity, self.conditioning.mode, self.hashed_inputs, tuple(sorted((self.hashed or {}).items())))


@dataclass(frozen=True)
class Layered:
    """A layering's conditioning with its input keys still templates, and where each key was set."""

    conditioning: Conditioning
    templates: dict[str, Template]
    where: dict[str, Where]


class Conditions:
    """Resolves and checks the conditioning of combinations (see the module)."""

    def __init__(self, mf: ManifestFile, inspect: Callable[[str], InputInfo]) -> None:
        self.mf = mf
        self.inspect = inspect
        self.base_dir = mf.path.resolve().parent
        self.modes = model_modes(mf.model)
        self._resolved: dict[tuple[Any, ...], Resolved] = {}

    def layered(self, conditioning: Conditioning, where: dict[str, Where]) -> Layered:
        """Check a layering's mode against the model and its inputs' presence; parse its templates."""
        mode = Mode(conditioning.mode)
        if mode is Mode.STITCH:
            raise error_at(where["mode"], "mode stitch is planned by farm for a sequence:", "add sequence: with shots:")
        if mode not in self.modes:
            raise error_at(
                where["mode"],
                f"model {self.mf.model.spec} ({self.mf.model.family}) cannot render mode {mode.value}",
                "it renders: " + ", ".join(sorted(m.value for m in self.modes if m is not Mode.STITCH)),
            )
        templates = {}
        for key in INPUT_KEYS:
            value = getattr(conditioning, key)
            if key in mode.input_keys and not value:
                raise error_at(
                    where["mode"],
                    f"mode {mode.value} needs {key}:",
                    f"add {key}: a path (relative to the manifest) or an s3:// URI",
                )
            if value and key not in mode.input_keys:
                readers = [m.value for m in Mode if key in m.input_keys and m in self.modes]
                raise error_at(
                    where[key],
                    f"{key}: is set but mode {mode.value} does not read it",
                    f"set mode: to {' or '.join(readers)}, or remove {key}:" if readers else f"remove {key}:",
                )
            if value:
                try:
                    templates[key] = parse_template(value)
                except TemplateError as exc:
                    raise error_at(where[key], str(exc), "write literal braces as {{ and }}") from None
        return Layered(conditioning, templates, where)

    def resolve(self, layered: Layered, values: dict[str, str], settings: RenderSettings) -> Resolved:
        """A combination's inputs filled in, inspected and checked against its settings."""
        c = layered.conditioning
        if not layered.templates and c.mode == Mode.T2V:  # the common case, kept cheap for a million tasks
            key: tuple[Any, ...] = (c,)
        else:
            uris = {k: self._uri(k, t, values, layered.where[k]) for k, t in layered.templates.items()}
            key = (c, tuple(sorted(uris.items())), settings.frames, settings.steps)
        if key not in self._resolved:
            self._resolved[key] = self._check(layered, dict(key[1]) if len(key) > 1 else {}, settings)
        return self._resolved[key]

    def file_input(self, role: InputRole, template: str, values: dict[str, str], where: Where) -> InputRef:
        """One image input outside a combination's conditioning (a sequence's keyframe)."""
        try:
            parsed = parse_template(template)
        except TemplateError as exc:
            raise error_at(where, str(exc), "write literal braces as {{ and }}") from None
        uri = self._uri("image", parsed, values, where)
        info = self._inspect("image", uri, where)
        return InputRef(role, uri, info.sha256)

    def _uri(self, key: str, template: Template, values: dict[str, str], where: Where) -> str:
        missing = [n for n in template.names if n not in values]
        if missing:
            raise error_at(where, f"placeholder {{{missing[0]}}} in {key}: has no value", f"add an axis {missing[0]}")
        text = template.fill(values).strip()
        if "://" in text:
            if not text.startswith("s3://"):
                raise error_at(where, f"{key}: {text} is neither a path nor an s3:// URI", "copy it to disk or S3")
            return text
        path = Path(text).expanduser()
        return str(path if path.is_absolute() else self.base_dir / path)

    def _inspect(self, key: str, uri: str, where: Where) -> InputInfo:
        from farm.inputs import InputProblem

        try:
            info = self.inspect(uri)
        except InputProblem as exc:
            raise error_at(where, exc.message, exc.hint) from None  # where names the key
        if info.kind != _KIND_OF_KEY[key]:
            hint = "use video: for a source clip" if info.kind == "video" else "give a video file (mp4, mov, webm…)"
            raise error_at(where, f"{uri} is {'a video' if info.kind == 'video' else 'an image'}", hint)
        return info

    def _check(self, layered: Layered, uris: dict[str, str], settings: RenderSettings) -> Resolved:
        c, where = layered.conditioning, layered.where
        mode = Mode(c.mode)
        refs, hashes = [], []
        for key in INPUT_KEYS:
            if key not in uris:
                continue
            info = self._inspect(key, uris[key], where[key])
            if mode is Mode.V2V and info.frames < settings.frames:
                raise error_at(
                    where[key],
                    f"video: {uris[key]} has {info.frames} frames, fewer than the {settings.frames} frames to render",
                    "lower frames: or give a longer clip",
                )
            refs.append(InputRef(InputRole(key), uris[key], info.sha256))
            hashes.append(info.sha256)
        hashed: dict[str, Any] | None = None
        if mode is not Mode.T2V:
            hashed = {"fit": Fit(c.fit).value}
            if mode is Mode.V2V:
                hashed["strength"] = c.strength
                if effective_steps(settings.steps, c.strength) < 1:
                    raise error_at(
                        where["strength"],
                        f"strength {c.strength} of {settings.steps} steps leaves no denoising step "
                        f"(int({settings.steps} × {c.strength}) = 0)",
                        "raise strength: or steps: so that steps × strength ≥ 1",
                    )
        resolved = replace(c, **uris)  # type: ignore[arg-type]  # the input keys are str fields
        return Resolved(resolved, tuple(refs), mode_identity(self.mf.model, mode), tuple(hashes), hashed)
