"""Hostile and out-of-range manifests are refused at the edge: one exact line, exit 2, nothing
rendered, in about a second (timings are in bench/frontend.py, not asserted here). Valid but
unusual files keep working."""

from __future__ import annotations

import subprocess
import sys

import pytest

FARM = [sys.executable, "-m", "farm.cli"]


def billion_laughs() -> str:
    text = 'campaign: x\nprompt: "{a}"\na0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, 10):
        text += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n"
    return text + "axes:\n  a: *a9\n"


def deep_aliases() -> str:
    """40 anchors, each 60 levels deep around an alias to the one before: 2,400 levels, 5 KB."""
    text = "campaign: x\nprompt: hi\n"
    for i in range(40):
        inner = f"*a{i - 1}" if i else "x"
        text += f"a{i}: &a{i} " + "[" * 60 + inner + "]" * 60 + "\n"
    return text + "render: *a39\n"


def huge_axes() -> str:
    axes = "".join(f"  {n}: [" + ",".join(str(i) for i in range(1000)) + "]\n" for n in "abcd")
    return 'campaign: x\nprompt: "{a} {b} {c} {d}"\nseeds: {count: 1000}\naxes:\n' + axes


CASES = [
    # Refused cleanly before: kept that way.
    (
        'campaign: x\nprompt: !!python/object/apply:os.system ["echo hi"]\n',
        "2",
        "YAML syntax error: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' — fix the indentation or quoting on that line",
    ),
    (
        'campaign: x\nprompt: "{a.__class__}"\naxes: {a: [1]}\n',
        "2",
        "prompt: placeholder {a.__class__} must be a plain name like {product} — write literal braces as {{ and }}",
    ),
    (
        "campaign: ../../etc\nprompt: hi\n",
        "1",
        "campaign: '../../etc' is not a valid campaign name — use letters, "
        "digits, '-', '_' or '.', starting with a letter or digit (at most 80)",
    ),
    (
        billion_laughs(),
        "1",
        "aliases repeat values past the limit: 8,335,593,937 more values than are written (at "
        "most 100,000) — write the values out, or move long lists into a rows: file",
    ),
    (
        deep_aliases(),
        "4",
        "nesting deeper than 64 levels through aliases — a manifest needs a few levels: flatten the structure",
    ),
    (
        "campaign: x\nprompt: hi\nseeds: [" + "1" * 5000 + "]\n",
        None,
        "a value cannot be read: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 "
        "digits; use sys.set_int_max_str_digits() to increase the "
        "limit",
    ),
    (
        'campaign: x\nprompt: "{p}"\naxes:\n  p:\n    - value: a\n      render: {negative_prompt: "{oops"}\n',
        "6",
        "axes.p[0].render.negative_prompt: unclosed '{' at character 1 — write literal braces as {{ and }}",
    ),
    (
        "campaign: x\nprompt: hi\nrender: " + "[" * 5000 + "]" * 5000 + "\n",
        "3",
        "nesting deeper than 64 levels — a manifest needs a few levels: flatten the structure",
    ),
    (
        "campaign: x\nprompt: hi\nrender:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(100)),
        "67",
        "nesting deeper than 64 levels — a manifest needs a few levels: flatten the structure",
    ),
    (
        "campaign: x\nprompt: hi\nrender: &r [*r]\n",
        "3",
        "an alias refers to a value that contains it — remove the recursive alias",
    ),
    (
        huge_axes(),
        "1",
        "campaign: the manifest makes 1,000,000,000,000,000 tasks (a 1,000 × b 1,000 × c 1,000 × "
        "d 1,000 × seeds 1,000), more than FARM_MAX_TASKS=1,000,000 — use fewer values, or raise FARM_MAX_TASKS if you "
        "mean it",
    ),
    (
        "campaign: x\nprompt: hi\nseeds: [9223372036854775808]\n",
        "3",
        "seeds[0]: 9223372036854775808: input should be less than or equal to 9223372036854775807",
    ),
    ("campaign: x\nprompt: hi\nseeds: [-1]\n", "3", "seeds[0]: -1: input should be greater than or equal to 0"),
    (
        "campaign: x\nprompt: hi\nseeds: {count: 5, base: 9223372036854775807}\n",
        "3",
        "seeds.base: the last seed, 9223372036854775811, is over the largest seed 9223372036854775807 — lower base: "
        "or count:",
    ),
    ("campaign: x\nprompt: hi\nrender: {fps: 0}\n", "3", "render.fps: 0: input should be greater than 0"),
    ("campaign: x\nprompt: hi\nrender: {steps: -1}\n", "3", "render.steps: -1: input should be greater than 0"),
    (
        "campaign: x\nprompt: hi\nrender: {guidance: .nan}\n",
        "3",
        "render.guidance: nan: input should be a finite number",
    ),
    (
        "campaign: x\nprompt: hi\nrender: {guidance: .inf}\n",
        "3",
        "render.guidance: inf: input should be a finite number",
    ),
    ("campaign: x\nprompt: hi\nrender: {guidance: 0}\n", "3", "render.guidance: 0: input should be greater than 0"),
    ("campaign: x\nprompt: hi\ntimeout_s: -5\n", "3", "timeout_s: -5: input should be greater than 0"),
    ("campaign: x\nprompt: hi\nretries: -1\n", "3", "retries: -1: input should be greater than or equal to 0"),
    (
        'campaign: x\nprompt: "' + "buy now " * 70 + 'call to action"\n',
        "2",
        "prompt: the prompt is 575 tokens, more than the 512 tokens model tiny's text encoder reads (the rest would be "
        "cut off without a word) — shorten it: the end, often the call to action, is what would be lost",
    ),
    (
        'campaign: x\nprompt: "{p}"\naxes:\n  p: [short, "' + "ü" * 600 + '"]\n',
        "2",
        "prompt: the prompt for p=" + "ü" * 600 + " is 1201 tokens, more than the 512 tokens model tiny's text "
        "encoder reads (the rest would be cut off without a word) — shorten it: the end, often the call to action, "
        "is what would "
        "be lost",
    ),
]


@pytest.mark.parametrize(("text", "line", "expected"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_hostile_and_out_of_range_manifests_are_one_exact_line_exit_2(tmp_path, farm_home, text, line, expected):
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    result = subprocess.run([*FARM, "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"error: {path}{f':{line}' if line else ''}: {expected}\n"


def test_a_stream_without_end_is_read_no_further_than_the_limit(farm_home):
    result = subprocess.run([*FARM, "validate", "/dev/zero"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "the manifest is larger than the 10 MB limit" in result.stderr


def test_a_manifest_over_10_mb_is_refused_unread(tmp_path, farm_home):
    path = tmp_path / "manifest.yaml"
    path.write_text("campaign: x\nprompt: hi\n# " + "x" * (11 * 2**20) + "\n")
    result = subprocess.run([*FARM, "submit", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: {path}: the manifest is larger than the 10 MB limit — move long lists into a "
        "rows: file (CSV or Parquet)\n"
    )
    assert not farm_home.exists()  # nothing started, nothing written


def test_farm_max_tasks_can_be_raised_and_lowered(tmp_path, farm_home):
    path = tmp_path / "manifest.yaml"
    path.write_text('campaign: x\nprompt: "{a}"\nseeds: {count: 3}\naxes:\n  a: [1, 2]\n')
    low = subprocess.run(
        [*FARM, "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "FARM_MAX_TASKS": "5"},
    )
    assert low.returncode == 2
    assert "the manifest makes 6 tasks (a 2 × seeds 3), more than FARM_MAX_TASKS=5" in low.stderr
    ok = subprocess.run([*FARM, "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "6 tasks" in ok.stdout


def test_unusual_but_valid_manifests_keep_working(tmp_path, farm_home):
    from farm.expand import count, expand
    from farm.manifest import load_manifest

    path = tmp_path / "manifest.yaml"
    text = (
        '\ufeffcampaign: ok\r\nprompt: "{p} 🎉 für {{lit}} 日本語"\r\naxes:\r\n  p:\r\n    - value: a\r\n'
        "      render: &r {width: 32}\r\n    - value: b\r\n      render:\r\n        <<: *r\r\n        height: 48\r\n"
        "    - value: c\r\n      render: {<<: *r, width: 16}\r\n"
    )
    path.write_bytes(text.encode("utf-8"))
    mf = load_manifest(path)
    tasks = expand(mf).tasks
    assert [t.prompt for t in tasks] == ["a 🎉 für {lit} 日本語", "b 🎉 für {lit} 日本語", "c 🎉 für {lit} 日本語"]
    assert [(t.settings.width, t.settings.height) for t in tasks] == [(32, 64), (32, 48), (16, 64)]  # merge, override
    assert count(mf).tasks == 3


def test_many_written_values_without_aliases_are_fine(tmp_path, farm_home):
    from farm.expand import count
    from farm.manifest import load_manifest

    path = tmp_path / "manifest.yaml"
    path.write_text(
        "campaign: many\ntasks:\n" + "".join(f"  - {{prompt: 'clip {i}', seed: {i}}}\n" for i in range(30000))
    )
    assert count(load_manifest(path)).tasks == 30000


def test_count_agrees_with_expand_on_collapses_rows_and_explicit_tasks(write_manifest, farm_home, tmp_path):
    from farm.expand import count, expand
    from farm.manifest import load_manifest

    (tmp_path / "rows.csv").write_text("product,seed,width\nshoe,,\nshoe,7,\nbag,,32\n")
    path = write_manifest("""
        campaign: c
        prompt: "{product} {color}"
        seeds: [1, 2]
        rows: rows.csv
        axes:
          color: [red, red, blue]
        tasks:
          - {prompt: "shoe red", seed: 1}
          - {prompt: "solo"}
    """)
    mf = load_manifest(path)
    expansion, counted = expand(mf), count(mf)
    assert (counted.tasks, counted.expanded) == (len(expansion.tasks), expansion.expanded)
    assert counted.expanded > counted.tasks  # the repeated color and the explicit duplicate collapsed
