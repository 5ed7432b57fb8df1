"""Every code sample of README.md and benchmarks/README.md runs as written (read from the files
themselves, so they cannot drift), each in a fresh process and an empty folder; and every help
screen lists its options with their defaults."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
_BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)

# Command samples that do not fit the suite: installs (the fresh-clone check runs those), several
# GPUs, whole benchmark runs, a CMake build (tests/test_cmake_build.py builds it).
TOO_LONG = ("pip install", "torch.distributed.run", "cmake ", "nanops bench", "benchmarks/gpu/",
            "python benchmarks/", "benchmarks/run.py")


def _samples():
    for readme in READMES:
        text = readme.read_text()
        for match in _BLOCK.finditer(text):
            language, code = match.groups()
            line = text[: match.start()].count("\n") + 1
            name = f"{readme.relative_to(ROOT)}:{line}"
            if language == "bash" and any(marker in code for marker in TOO_LONG):
                continue
            yield pytest.param(language, code, id=name)


SAMPLES = list(_samples())


def test_the_readmes_have_samples_to_run():
    assert sum(1 for s in SAMPLES if s.values[0] == "python") >= 4
    assert any("nanops train" in s.values[1] for s in SAMPLES)


@pytest.mark.parametrize("language,code", SAMPLES)
def test_sample_runs_as_written(language, code, tmp_path):
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-e", "-c", code]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


@pytest.mark.parametrize("command", [["demo"], ["check"], ["doctor"], ["bench"]])
def test_help_lists_every_option_with_its_default(command, capsys):
    from nanops.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"nanops {command[0]} {action.option_strings[0]}: no help text"
            if action.default not in (None, False) and not isinstance(action.default, bool):
                assert "%(default)s" in action.help or str(action.default) in action.help, (
                    f"nanops {command[0]} {action.option_strings[0]}: help does not show the default")


def test_benchmark_tables_are_the_result_files():
    """benchmarks/README.md's result tables are rendered from the committed JSON: a figure there
    cannot drift from its file (python benchmarks/readme_tables.py rewrites them)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_demo_output_quoted_in_the_readme_is_the_committed_run():
    """The demo run README.md shows is benchmarks/results/demo/<device>.txt, word for word."""
    text = (ROOT / "README.md").read_text()
    marker = re.search(r"<!-- demo: (\S+) -->\n```\n(.*?)```", text, re.S)
    assert marker, "README.md quotes the demo without naming its result file"
    recorded = (ROOT / "benchmarks" / marker.group(1)).read_text()
    quoted = marker.group(2)
    for line in quoted.splitlines():
        if line.strip() != "...":
            assert line in recorded.splitlines(), f"not in {marker.group(1)}: {line!r}"


def test_seed_table_is_the_committed_seed_run():
    import json

    text = (ROOT / "README.md").read_text()
    marker = re.search(r"<!-- seed: (\S+) -->\n", text)
    assert marker, "README.md's seed table names no result file"
    runs = {r["run"]: r for r in json.loads((ROOT / "benchmarks" / marker.group(1)).read_text())["results"]}
    table = text[marker.end():].split("\n\n", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    plain, ours = runs["plain"]["epochs"], runs["nanops"]["epochs"]
    assert len(rows) == len(plain) == len(ours)
    for cells, p, o in zip(rows, plain, ours):
        assert int(cells[0]) == p["epoch"] == o["epoch"]
        assert cells[3].strip() == f"{p['map50']:.4f}" and cells[8].strip() == f"{o['map50']:.4f}"
