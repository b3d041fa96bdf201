"""A ``sequence:`` planned as a task graph: per variant and seed, one segment a shot, the keyframe
stills they need, and the film that stitches them. Pure: inputs come checked from ``Conditions``.

- **chained**: segment 1 is text-to-video (image-to-video from the first shot's ``image:``);
  segment k continues segment k−1's last frame (``extend``) and waits for it. Depth N.
- **keyframes**: a still for each shot's first frame and one closing the last shot (or the given
  ``image:``/``last_image:``), then every segment at once, first/last-frame between its two
  keyframes. Depth 2, whatever the number of shots.
- the film (``stitch``) waits for every segment.

A task that reads another task's output hashes that task's id (rendering is deterministic, so the
id names the pixels): edit shot 3 and shots 3… and the film get new ids, shots 1–2 keep theirs.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from farm.config import SEQUENCE_OVERLAP_FRAMES
from farm.manifest import ManifestFile, SequencePlan, SequenceSpec
from farm.models import mode_identity
from farm.sequence.stitch import film_length
from farm.task import (
    Conditioning,
    Fit,
    InputRef,
    InputRole,
    Mode,
    RenderSettings,
    Requirements,
    Stitching,
    Task,
    compute_task_id,
)
from farm.template import Template, TemplateError, parse_template

if TYPE_CHECKING:
    from farm.conditions import Conditions
    from farm.expand import Expansion, _Combination

PART, SHOT = "part", "shot"  # variant keys a sequence's tasks carry: what part of which shot they are


class Part:
    KEYFRAME = "keyframe"
    SEGMENT = "segment"
    FILM = "film"


def tasks_per_sequence(seq: SequenceSpec) -> int:
    """Tasks one sequence makes (before identical ones collapse): what FARM_MAX_TASKS counts."""
    shots = len(seq.shots)
    if seq.plan is SequencePlan.KEYFRAMES:
        given = sum(1 for s in seq.shots if s.image) + (1 if seq.last_image else 0)
        return shots + (shots + 1 - given) + 1
    return shots + 1


@dataclass(frozen=True)
class _One:
    """What one sequence's tasks share."""

    values: dict[str, str]
    variant: tuple[tuple[str, str], ...]
    settings: RenderSettings
    needs: Requirements
    seed: int
    fit: Fit
    source: str


def expand_sequences(mf: ManifestFile, combinations: Iterable[_Combination], conditions: Conditions) -> Expansion:
    """Every combination × seed of the manifest planned as one sequence."""
    from farm.expand import Expansion

    planner = _Planner(mf, conditions)
    tasks: dict[str, Task] = {}
    expanded = 0
    for c in combinations:
        planner.check(c)
        variant = tuple(sorted(c.values.items()))
        for seed in c.seeds:
            one = _One(c.values, variant, c.settings, c.needs, seed, c.resolved.conditioning.fit, c.source)
            for task in planner.plan(one):
                expanded += 1
                tasks.setdefault(task.task_id, task)
    return Expansion(list(tasks.values()), expanded)


class _Planner:
    def __init__(self, mf: ManifestFile, conditions: Conditions) -> None:
        assert mf.manifest.sequence is not None
        self.mf = mf
        self.seq = mf.manifest.sequence
        self.conditions = conditions
        self.prompts = [self._template(i, s.prompt) for i, s in enumerate(self.seq.shots)]
        self.stitching = Stitching(
            self.seq.crossfade if self.seq.crossfade is not None else 0,
            self.seq.color_match if self.seq.color_match is not None else True,
        )
        needed = {Mode.T2V, Mode.STITCH}
        needed |= {Mode.FLF2V} if self.seq.plan is SequencePlan.KEYFRAMES else {Mode.EXTEND}
        if self.seq.shots[0].image and self.seq.plan is SequencePlan.CHAINED:
            needed = (needed - {Mode.T2V}) | {Mode.I2V}
        missing = sorted(m.value for m in needed - conditions.modes)
        if missing:
            raise mf.error(
                f"model {mf.model.spec} ({mf.model.family}) cannot render the {self.seq.plan.value} plan's "
                f"{', '.join(missing)} tasks",
                "sequence",
                "plan",
                hint="use a model that renders them, e.g. model: tiny",
            )
        if self.seq.last_image and self.seq.plan is not SequencePlan.KEYFRAMES:
            raise mf.error(
                "last_image: closes a keyframes plan; a chained sequence ends where its last shot goes",
                "sequence",
                "last_image",
                hint="set plan: keyframes, or remove last_image:",
            )
        self._checked_settings: set[RenderSettings] = set()
        from farm.expand import PromptLength

        self.length = PromptLength(mf)

    def _template(self, i: int, text: str) -> Template:
        try:
            return parse_template(text)
        except TemplateError as exc:
            raise self.mf.error(
                str(exc), "sequence", "shots", i, "prompt", hint="write literal braces as {{ and }}"
            ) from None

    def check(self, c: _Combination) -> None:
        """Per combination (an axis value may set anything): what a sequence cannot have, its
        placeholders' values, its shots' frames (once per distinct settings)."""
        if c.source != "matrix":
            raise self.mf.error("a sequence manifest has no tasks:", "tasks", hint="remove tasks:")
        if c.resolved.conditioning.mode is not Mode.T2V:
            raise self.mf.error(
                "a sequence plans its own modes",
                "mode",
                hint="remove mode: and its inputs from the campaign and its axis values (give shots image: keyframes)",
            )
        for key in (PART, SHOT):
            if key in c.values:
                raise self.mf.error(
                    f"{key!r} names a sequence's tasks' parts; an axis or column of a sequence cannot be called that",
                    "axes",
                    key,
                    hint="rename it",
                )
        if c.settings not in self._checked_settings:
            self._check_shots(c.settings)
            self._checked_settings.add(c.settings)
        for i, template in enumerate(self.prompts):
            missing = [n for n in template.names if n not in c.values]
            if missing:
                raise self.mf.error(
                    f"placeholder {{{missing[0]}}} has no axis",
                    "sequence",
                    "shots",
                    i,
                    "prompt",
                    hint=f"add axes: {missing[0]}: [...], or remove {{{missing[0]}}}",
                )

    def _check_shots(self, settings: RenderSettings) -> None:
        crossfade = self.stitching.crossfade
        for i, shot in enumerate(self.seq.shots):
            frames = shot.frames or settings.frames
            where = ("sequence", "shots", i, "frames") if shot.frames else ("render", "frames")
            for problem in self.mf.constraints.problems(settings.width, settings.height, frames).values():
                raise self.mf.error(f"{problem} (model {self.mf.model.spec})", *where)
            if i and frames <= SEQUENCE_OVERLAP_FRAMES + crossfade:
                raise self.mf.error(
                    f"shot {i + 1} has {frames} frames: a later shot needs more than its {SEQUENCE_OVERLAP_FRAMES} "
                    f"overlapping frame and the {crossfade} crossfade frames",
                    *where,
                    hint="give it more frames: or lower crossfade:",
                )
            if not i and len(self.seq.shots) > 1 and frames <= crossfade:
                raise self.mf.error(
                    f"shot 1 has {frames} frames: the {crossfade} crossfade frames need more",
                    *where,
                    hint="give it more frames: or lower crossfade:",
                )
            if i and shot.image and self.seq.plan is SequencePlan.CHAINED:
                raise self.mf.error(
                    f"shot {i + 1} of a chained sequence continues the shot before: it takes no image:",
                    "sequence",
                    "shots",
                    i,
                    "image",
                    hint="use plan: keyframes to pin each shot's first frame",
                )

    def plan(self, one: _One) -> Iterator[Task]:
        prompts = [t.fill(one.values) for t in self.prompts]
        for i, prompt in enumerate(prompts):
            self.length.check_text(prompt, "prompt", self.mf.where("sequence", "shots", i, "prompt"), one.values)
        frames = [s.frames or one.settings.frames for s in self.seq.shots]
        if self.seq.plan is SequencePlan.KEYFRAMES:
            segments = yield from self._keyframed(one, prompts, frames)
        else:
            segments = yield from self._chained(one, prompts, frames)
        yield self._film(one, prompts, frames, segments)

    def _task(
        self,
        one: _One,
        part: tuple[str, int],
        prompt: str,
        settings: RenderSettings,
        seed: int,
        mode: Mode,
        inputs: tuple[InputRef, ...] = (),
        hashed: dict[str, object] | None = None,
    ) -> Task:
        """A keyframe or a segment: its id hashes its inputs' content, or the ids of the tasks it reads."""
        hashed_inputs = tuple(i.task_id or i.sha256 for i in inputs)
        if mode is not Mode.T2V:
            hashed = {**(hashed or {}), "fit": one.fit}
        identity = mode_identity(self.mf.model, mode)
        task_id = compute_task_id(identity, mode, prompt, settings, seed, hashed_inputs, hashed)
        files = {i.role.value: i.uri for i in inputs if i.task_id is None}
        conditioning = Conditioning(mode=mode, fit=one.fit, **files)  # type: ignore[arg-type]
        variant = tuple(sorted({**dict(one.variant), PART: part[0], SHOT: str(part[1])}.items()))
        parents = tuple(dict.fromkeys(i.task_id for i in inputs if i.task_id))
        return Task(
            task_id,
            prompt,
            seed,
            self.mf.model,
            settings,
            variant,
            conditioning,
            one.source,
            one.needs,
            inputs,
            parents,
        )

    def _given(self, role: InputRole, image: str, one: _One, where: tuple) -> InputRef:
        return self.conditions.file_input(role, image, one.values, self.mf.where(*where))

    def _chained(self, one: _One, prompts: list[str], frames: list[int]) -> Generator[Task, None, list[Task]]:
        segments: list[Task] = []
        for i, prompt in enumerate(prompts):
            settings = replace(one.settings, frames=frames[i])
            if i == 0:
                image = self.seq.shots[0].image
                inputs = (self._given(InputRole.IMAGE, image, one, ("sequence", "shots", 0, "image")),) if image else ()
                mode = Mode.I2V if image else Mode.T2V
            else:
                inputs, mode = (InputRef(InputRole.VIDEO, f"task:{segments[-1].task_id}"),), Mode.EXTEND
            segments.append(self._task(one, (Part.SEGMENT, i + 1), prompt, settings, one.seed, mode, inputs))
            yield segments[-1]
        return segments

    def _keyframed(self, one: _One, prompts: list[str], frames: list[int]) -> Generator[Task, None, list[Task]]:
        keys: list[InputRef] = []
        shots = self.seq.shots
        for k in range(len(shots) + 1):
            image = shots[k].image if k < len(shots) else self.seq.last_image
            where = ("sequence", "shots", k, "image") if k < len(shots) else ("sequence", "last_image")
            if image:
                keys.append(self._given(InputRole.IMAGE, image, one, where))
                continue
            # The closing keyframe shows the last shot's prompt too: its id says it closes the shot, so it
            # differs from the opening one (and from another seed's keyframes).
            closing: dict[str, object] | None = {"keyframe": "closing"} if k == len(shots) else None
            still = self._task(
                one, (Part.KEYFRAME, k + 1), prompts[min(k, len(shots) - 1)], replace(one.settings, frames=1),
                one.seed, Mode.T2V, hashed=closing,
            )  # fmt: skip
            keys.append(InputRef(InputRole.IMAGE, f"task:{still.task_id}"))
            yield still
        segments = []
        for i, prompt in enumerate(prompts):
            inputs = (replace(keys[i], role=InputRole.IMAGE), replace(keys[i + 1], role=InputRole.LAST_IMAGE))
            settings = replace(one.settings, frames=frames[i])
            segments.append(self._task(one, (Part.SEGMENT, i + 1), prompt, settings, one.seed, Mode.FLF2V, inputs))
            yield segments[-1]
        return segments

    def _film(self, one: _One, prompts: list[str], frames: list[int], segments: list[Task]) -> Task:
        ids = tuple(s.task_id for s in segments)
        settings = replace(one.settings, frames=film_length(frames, self.stitching.crossfade))
        # Only the segments and the joins make the film's pixels: not the prompts, not the seed.
        task_id = compute_task_id("stitch", Mode.STITCH, "", settings, 0, ids, asdict(self.stitching))
        inputs = tuple(InputRef(InputRole.SEGMENT, f"task:{i}") for i in ids)
        variant = tuple(sorted({**dict(one.variant), PART: Part.FILM, SHOT: f"1-{len(segments)}"}.items()))
        return Task(
            task_id,
            " / ".join(prompts),
            one.seed,
            self.mf.model,
            settings,
            variant,
            Conditioning(mode=Mode.STITCH),
            one.source,
            one.needs,  # where the segments render: a renderer of the model is there
            inputs,
            ids,
            self.stitching,
        )
