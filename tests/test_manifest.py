"""Manifest loading, validation errors (file:line: field) and matrix expansion. No Ray, no torch."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.errors import ManifestError
from farm.expand import expand
from farm.manifest import load_manifest

BASE = """
campaign: spring
prompt: "{product} for {audience}"
axes:
  product: [shoe, bag]
  audience: [kids, adults, pros]
"""


def tasks_of(path, **kw):
    return expand(load_manifest(path, **kw)).tasks


def error_of(path) -> str:
    with pytest.raises(ManifestError) as info:
        expand(load_manifest(path))
    return str(info.value)


def test_cartesian_product_of_axes_times_seeds(write_manifest, farm_home):
    tasks = tasks_of(write_manifest(BASE + "seeds: [1, 2]\n"))
    assert len(tasks) == 2 * 3 * 2
    assert {t.prompt for t in tasks} == {f"{p} for {a}" for p in ("shoe", "bag") for a in ("kids", "adults", "pros")}
    assert {t.seed for t in tasks} == {1, 2}
    first = tasks[0]
    assert first.variant_dict == {"product": "shoe", "audience": "kids"}
    assert (first.settings.width, first.settings.height, first.settings.frames) == (64, 64, 9)


def test_seed_count_from_base(write_manifest, farm_home):
    tasks = tasks_of(write_manifest(BASE + "seeds: {count: 3, base: 100}\n"))
    assert sorted({t.seed for t in tasks}) == [100, 101, 102]


def test_zip_pairs_values_instead_of_crossing_them(write_manifest, farm_home):
    path = write_manifest("""
        campaign: zipped
        prompt: "{product} {cta}"
        axes:
          product: [shoe, bag]
        zip:
          - language: [en, de, fr]
            cta: [Buy, Kaufen, Achetez]
        """)
    tasks = tasks_of(path)
    assert len(tasks) == 2 * 3
    pairs = {(t.variant_dict["language"], t.variant_dict["cta"]) for t in tasks}
    assert pairs == {("en", "Buy"), ("de", "Kaufen"), ("fr", "Achetez")}


def test_axis_value_overrides_render_settings_and_task_overrides_win(write_manifest, farm_home):
    path = write_manifest("""
        campaign: sizes
        prompt: "{platform} ad"
        render: {width: 64, height: 64, steps: 3}
        axes:
          platform:
            - value: tiktok
              render: {width: 48, height: 80}
            - youtube
        tasks:
          - prompt: "hero shot"
            seed: 9
            render: {frames: 13, steps: 6}
        """)
    by_prompt = {t.prompt: t for t in tasks_of(path)}
    assert (by_prompt["tiktok ad"].settings.width, by_prompt["tiktok ad"].settings.height) == (48, 80)
    assert (by_prompt["youtube ad"].settings.width, by_prompt["youtube ad"].settings.steps) == (64, 3)
    hero = by_prompt["hero shot"]
    assert (hero.seed, hero.settings.frames, hero.settings.steps, hero.source) == (9, 13, 6, "tasks[0]")


def test_identical_tasks_collapse_into_one(write_manifest, farm_home):
    path = write_manifest("""
        campaign: dup
        prompt: "same {x}"
        axes:
          x: [a, a, b]
        tasks:
          - prompt: "same b"
        """)
    expansion = expand(load_manifest(path))
    assert expansion.expanded == 4
    assert sorted(t.prompt for t in expansion.tasks) == ["same a", "same b"]


def test_task_id_is_stable_and_follows_every_pixel_input(write_manifest, farm_home):
    ids = {t.prompt: t.task_id for t in tasks_of(write_manifest(BASE))}
    again = {t.prompt: t.task_id for t in tasks_of(write_manifest(BASE))}
    assert ids == again
    assert len(set(ids.values())) == len(ids)
    changed = {t.prompt: t.task_id for t in tasks_of(write_manifest(BASE + "render: {steps: 5}\n"))}
    assert not set(changed.values()) & set(ids.values())
    reseeded = {t.prompt: t.task_id for t in tasks_of(write_manifest(BASE + "seeds: [1]\n"))}
    assert not set(reseeded.values()) & set(ids.values())


def test_rows_from_csv_cross_with_axes_and_override_per_row(tmp_path, write_manifest, farm_home):
    (tmp_path / "variants.csv").write_text("product,copy,width,seed\nshoe,Run faster,96,5\nbag,Carry more,,\n")
    path = write_manifest("""
        campaign: rows
        prompt: "{product}: {copy} ({platform})"
        axes:
          platform: [reels, shorts]
        rows: variants.csv
        seeds: [1, 2]
        """)
    tasks = tasks_of(path)
    shoe = [t for t in tasks if t.variant_dict["product"] == "shoe"]
    bag = [t for t in tasks if t.variant_dict["product"] == "bag"]
    assert len(shoe) == 2 and {t.seed for t in shoe} == {5} and {t.settings.width for t in shoe} == {96}
    assert len(bag) == 4 and {t.seed for t in bag} == {1, 2} and {t.settings.width for t in bag} == {64}
    assert shoe[0].source == "matrix"


def test_rows_from_parquet(tmp_path, write_manifest, farm_home):
    pq.write_table(
        pa.table({"product": ["a", "b", "c"], "prompt": ["", "custom {product}", ""]}), tmp_path / "rows.parquet"
    )
    path = write_manifest("""
        campaign: pq
        prompt: "template {product}"
        rows: {path: rows.parquet}
        """)
    # A row's own prompt is a template too: filled from the same row.
    assert sorted(t.prompt for t in tasks_of(path)) == ["custom b", "template a", "template c"]


def test_output_defaults_under_farm_home_and_resolves_relative_to_manifest(tmp_path, write_manifest, farm_home):
    assert load_manifest(write_manifest(BASE)).target.uri == str(farm_home / "outputs" / "spring")
    assert load_manifest(write_manifest(BASE + "output: clips\n")).target.uri == str(tmp_path / "clips")


# --- errors: one line, file:line: field: what — how to fix


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + "colour: red\n",
            ":6: colour: unknown key 'colour' — allowed here: campaign, model, prompt, render, axes, zip, seeds, "
            "tasks, sequence, rows, output, storage, retries",
        ),
        (
            BASE + "render:\n  width: 65\n",
            ":7: render.width: 65 is not a multiple of 16; use 64 or 80 (model tiny)",
        ),
        (
            BASE + "render:\n  frames: 10\n",
            ":7: render.frames: 10 frames: this model takes 4·k+1 frames; use 9 or 13 (model tiny)",
        ),
        (
            BASE + "render:\n  width: 1024\n",
            ":7: render.width: 1024 is larger than this model's maximum 512 (model tiny)",
        ),
        (
            BASE + "seeds: {count: 0}\n",
            ":6: seeds.count: 0: input should be greater than 0",
        ),
        (
            BASE + "render: {steps: -2}\n",
            ":6: render.steps: -2: input should be greater than 0",
        ),
        (
            'campaign: x\nprompt: "{product} in {city}"\naxes:\n  product: [a]\n',
            ":2: prompt: placeholder {city} has no axis — add axes: city: [...] (or a column/var named city), "
            "or remove {city}",
        ),
        (
            "campaign: x\nprompt: 'a {b'\n",
            ":2: prompt: unclosed '{' at character 3 — write literal braces as {{ and }}",
        ),
        (
            "campaign: x\nprompt: hi\naxes:\n  product: [a, b\n",
            ":5: YAML syntax error: did not find expected ',' or ']' — fix the indentation or quoting on that line",
        ),
        (
            "campaign: x\nprompt: hi\ncampaign: y\n",
            ":3: campaign: key 'campaign' appears twice — keep one of them",
        ),
        (
            "prompt: hi\n",
            ":1: campaign: missing required key 'campaign' — add campaign: to the manifest",
        ),
        (
            BASE.replace("campaign: spring", "campaign: 'spring sale'"),
            ":1: campaign: 'spring sale' is not a valid campaign name — use letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (at most 80)",
        ),
        (
            BASE + "model: ./no-such-model\n",
            "no-such-model does not exist — give a local diffusers directory (with model_index.json), a hub id, "
            "or 'tiny'",
        ),
        (
            BASE + "rows: missing.csv\n",
            ":6: rows: rows file ",
        ),
        (
            "campaign: x\nprompt: '{a}{b}'\nzip:\n  - a: [1, 2]\n    b: [1]\n",
            ":4: zip[0]: zipped axes must have the same number of values (a has 2, b has 1) — make the lists "
            "the same length, or move an axis to axes:",
        ),
        (
            "campaign: x\nprompt: '{a}'\naxes:\n  a: []\n",
            ":4: axes.a: axis 'a' has no values — give at least one value",
        ),
        (
            "campaign: x\nretries: -1\nprompt: hi\n",
            ":2: retries: -1: input should be greater than or equal to 0",
        ),
        (BASE + "deadline: soon\n", ":6: deadline: 'soon' is neither a duration nor a time: write e.g. 6h, 90m"),
        (BASE + "deadline: -5\n", ":6: deadline: must be positive"),
        (BASE + "deadline: .nan\n", ":6: deadline: nan is not a number of seconds"),
        (BASE + "deadline: 400d\n", ":6: deadline: 400d is more than a year"),
        (BASE + "deadline: 2099-01-01\n", ":6: deadline: '2099-01-01' has no time zone"),
        (BASE + "deadline: '2099-01-01T09:00'\n", ":6: deadline: '2099-01-01T09:00' has no time zone: add one"),
        (
            BASE + "axes2: 1\n",
            ":6: axes2: unknown key 'axes2'",
        ),
        (
            "campaign: x\nprompt: '{p}'\naxes:\n  p:\n    - value: a\n      render: {widht: 64}\n",
            ":6: axes.p[0].render.widht: unknown key 'widht' — allowed here: width, height, frames, fps, steps, "
            "guidance, negative_prompt",
        ),
    ],
)
def test_bad_manifest_gives_one_line_with_file_line_and_field(write_manifest, farm_home, text, expected):
    path = write_manifest(text)
    message = error_of(path)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message, message


def test_missing_manifest_file(tmp_path, farm_home):
    with pytest.raises(ManifestError, match=r"manifest .*nope.yaml does not exist — check the path"):
        load_manifest(tmp_path / "nope.yaml")


def test_bad_cell_in_rows_file_names_file_line_and_column(tmp_path, write_manifest, farm_home):
    (tmp_path / "v.csv").write_text("product,width\nshoe,64\nbag,wide\n")
    message = error_of(write_manifest("campaign: x\nprompt: '{product}'\nrows: v.csv\n"))
    assert message.startswith(f"{tmp_path / 'v.csv'}:3: row column width: 'wide': input should be a valid integer")


def test_explicit_task_prompt_with_unknown_placeholder(write_manifest, farm_home):
    message = error_of(write_manifest("campaign: x\ntasks:\n  - prompt: 'a {thing}'\n    vars: {other: 1}\n"))
    assert ":3: tasks[0].prompt: placeholder {thing} has no value — add vars: {thing: ...}" in message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90m", 5400),
        ("6h", 21600),
        ("1.5d", 129600),
        (3600, 3600),
        ("1h30m", 5400),
        ("2d 12h", 216000),
        ("2027-03-01T09:00:00+01:00", 3600),
    ],
)
def test_deadline_is_a_duration_or_a_time_with_its_zone(value, seconds):
    from datetime import UTC, datetime

    from farm.config import MAX_DEADLINE_S
    from farm.timeparse import Deadline

    now = datetime(2027, 3, 1, 7, 0, tzinfo=UTC)
    assert Deadline.parse(value, MAX_DEADLINE_S).seconds_left(now) == seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2027-03-01T09:00:00", "'2027-03-01T09:00:00' has no time zone: add one, e.g. 2027-03-01T09:00:00+00:00"),
        ("soon", "'soon' is neither a duration nor a time"),
        ("0s", "must be positive"),
        ("400d", "is more than a year"),
    ],
)
def test_bad_deadlines_say_what_to_write(write_manifest, farm_home, value, expected):
    message = error_of(write_manifest(BASE + f"deadline: '{value}'\n"))
    assert "deadline: " in message and expected in message, message


def test_since_and_until_share_the_deadline_grammar():
    from datetime import UTC, datetime, timedelta

    from farm.timeparse import time_ago

    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert time_ago("1h30m", now) == now - timedelta(minutes=90)
    assert time_ago("3600", now) == now - timedelta(hours=1)
    assert time_ago("2026-11-25T08:00", now) == datetime(2026, 11, 25, 8, 0, tzinfo=UTC)  # UTC unless it says
    with pytest.raises(ValueError, match="neither a duration nor a time"):
        time_ago("yesterday", now)


def test_unquoted_yaml_time_is_a_deadline(write_manifest, farm_home):
    from datetime import datetime, timedelta, timezone

    loaded = load_manifest(write_manifest(BASE + "deadline: 2099-03-01T09:00:00+01:00\n"))
    assert loaded.deadline is not None
    assert loaded.deadline.fixed == datetime(2099, 3, 1, 9, tzinfo=timezone(timedelta(hours=1)))


def test_a_passed_deadline_does_not_stop_a_late_campaign_from_resuming(write_manifest, farm_home):
    from datetime import UTC, datetime

    loaded = load_manifest(write_manifest(BASE + "deadline: 2020-01-01T00:00:00+00:00\n"))
    assert loaded.deadline is not None
    assert loaded.deadline.seconds_left(datetime(2020, 1, 1, 0, 5, tzinfo=UTC)) == -300
