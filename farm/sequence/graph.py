"""A job's task graph as people read it: films, their segments and keyframes, depth, what waits on
what. Pure; ``farm plan`` and ``farm results`` show it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from farm.task import Mode, Task


@dataclass(frozen=True)
class Film:
    """A stitch task and the tasks it is made of, in order."""

    film: Task
    segments: tuple[Task, ...]
    keyframes: tuple[Task, ...]  # keyframe stills rendered for it (keyframes plan)
    depth: int  # tasks in the longest chain ending at the film, the film included


@dataclass(frozen=True)
class Graph:
    films: tuple[Film, ...]
    depth: int  # the longest chain of tasks waiting on each other (1: nothing waits)
    dependent: int  # tasks that wait on another


def depths(tasks: Iterable[Task]) -> dict[str, int]:
    """Task id → the length of the longest chain of parents ending at it (1: no parents among
    ``tasks``). Iterative: a 1,000-shot chain is no recursion problem."""
    by_id = {t.task_id: t for t in tasks}
    depth: dict[str, int] = {}
    for start in by_id:
        stack = [start]
        while stack:
            task_id = stack[-1]
            if task_id in depth:
                stack.pop()
                continue
            parents = [p for p in by_id[task_id].parents if p in by_id]
            todo = [p for p in parents if p not in depth]
            if todo:
                stack.extend(todo)
                continue
            depth[task_id] = 1 + max((depth[p] for p in parents), default=0)
            stack.pop()
    return depth


def graph_of(tasks: Sequence[Task]) -> Graph:
    by_id = {t.task_id: t for t in tasks}
    depth = depths(tasks)
    films = []
    for task in tasks:
        if task.mode is not Mode.STITCH:
            continue
        segments = tuple(by_id[p] for p in task.parents if p in by_id)
        keys = tuple(
            dict.fromkeys(
                by_id[p]
                for s in segments
                for p in s.parents
                if p in by_id and by_id[p].variant_dict.get("part") == "keyframe"
            )
        )
        films.append(Film(task, segments, keys, depth[task.task_id]))
    return Graph(tuple(films), max(depth.values(), default=0), sum(1 for t in tasks if t.parents))


def part_label(variant: Mapping[str, str]) -> str:
    """'segment 2', 'keyframe 1', 'film': what part of a sequence a task is (from its variant)."""
    part, shot = variant.get("part", ""), variant.get("shot", "")
    return part if part == "film" or not part else f"{part} {shot}"
