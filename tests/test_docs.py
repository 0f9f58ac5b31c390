"""The README and docs/ against the code and the data: generated tables equal what their data gives, and every
command they show composes (``python run.py ...``, with Hydra's compose API, in this process) or answers ``--help``
(``python -m ...``); the error lines they show are the ones run.py prints."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from analysis import docs
from tests.conftest import ROOT, compose_config, preflight

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```bash\n(.*?)```", re.S)
INLINE = re.compile(r"`(python (?:run\.py|-m) [^`]*)`")
# modules whose `python -m` lines are checked with --help (others, pytest and wandb, are tools, not this project's)
OURS = ("analysis.", "benchmarks.", "semvae.")
# commands the docs show failing on purpose, with the start of the message they print
FAILING = {
    "python run.py trainer.epoch=3": "error: unknown config key 'trainer.epoch'",
    "python run.py loss.beta=-1": "error: loss.beta=-1.0: must be finite and >= 0",
}


def shell_commands(page: Path) -> list[str]:
    """The commands of a page: every line of its bash blocks (continuations joined, comments and shell loops' own
    lines dropped, ``$VAR``/``$(...)`` replaced by a placeholder), and the inline ``python ...`` spans of its text
    that are whole commands (no ``...``)."""
    text = page.read_text()
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$\([^)]*\)|\$\{\w+\}|\$\w+", "X", line).strip()
            for part in re.split(r"&&|;", line):
                words = shlex.split(part, comments=True)
                if words and words[0] in ("python", "python3") and words[:2] != ["python3", "-m"]:
                    found.append(shlex.join(words))
    for span in INLINE.findall(text):
        if "..." not in span and "DATE" not in span and "PATH" not in span:
            found.append(span)
    return found


def ours(command: str) -> bool:
    """run.py, or a ``python -m`` module of this project (pytest and wandb are tools the docs also show)."""
    words = shlex.split(command)
    return words[1] != "-m" or words[2].startswith(OURS)


def all_commands() -> list[tuple[str, str]]:
    found = {(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in shell_commands(page)}
    return sorted(entry for entry in found if ours(entry[1]))


def run_py_jobs(args: list[str]) -> list[list[str]]:
    """The jobs of ``run.py ARGS``: one, or with ``-m`` the first and last of the sweep's expansion."""
    if "-m" not in args and "--multirun" not in args:
        return [args]
    from semvae.plan import sweep_overrides

    jobs = sweep_overrides([a for a in args if a not in ("-m", "--multirun")])
    return [jobs[0], jobs[-1]]


def test_generated_blocks_equal_their_data():
    """`python -m analysis.docs --check`: every table written from committed data is what that data gives now."""
    assert docs.stale() == [], "run python -m analysis.docs"
    names = {m.group("name") for page in docs.pages() for m in docs.BLOCK.finditer(page.read_text())}
    assert names == set(docs.BLOCKS), "every block is on some page, and every marker names a block"


def test_a_changed_number_makes_its_page_stale(tmp_path, monkeypatch):
    """The check can fail: a Results value changed in the data leaves the README's headline block stale."""
    results = tmp_path / "analysis" / "results"
    results.mkdir(parents=True)
    for name in ("comparison.csv", "differences_from_vae.csv", "differences_from_beta.csv"):
        (results / name).write_text((docs.RESULTS / name).read_text())
    frame = (results / "comparison.csv").read_text().replace("0.007386770363353814", "0.00801", 1)
    (results / "comparison.csv").write_text(frame)
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    monkeypatch.setattr(docs, "RESULTS", results)
    monkeypatch.setattr(docs, "PAGES", ("README.md",))
    assert docs.stale(tmp_path) == ["README.md: headline"]
    assert "| MSE | 0.00801 ± 0.00023 |" in docs.render((tmp_path / "README.md").read_text())


@pytest.mark.parametrize(
    "mean, half_width, n, text",
    [
        (0.007386, 0.000227, 3, "0.00739 ± 0.00023"),
        (95.72, 0.874, 3, "95.72 ± 0.87"),
        (16.0, 0.0, 3, "16 ± 0"),
        (0.93721, float("nan"), 1, "0.937"),
    ],
)
def test_numbers_are_written_to_their_interval(mean, half_width, n, text):
    """A mean to the place of its interval's two significant digits; one seed gives a value, never an interval."""
    assert docs.mean_pm(mean, half_width, n) == text


def test_the_readme_is_short_and_has_the_ci_commands():
    """At most 200 lines, and the install and test commands that .ci/run runs are on it as written."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"', "python -m pytest"):
        assert command in ci and command in readme


def test_pages_link_to_files_that_exist():
    """Every relative link of the README and docs/ names a file of the repository (pages written by others, the
    cluster and stacking pages, may follow later)."""
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target in ("cluster.md", "stacking.md"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert missing == []


@pytest.mark.parametrize("page, command", all_commands())
def test_every_command_shown_composes_or_answers_help(page, command):
    """A ``python run.py`` line composes into a config that validates (each job of a ``-m`` sweep: its first and
    last); a ``python -m`` line of this project answers ``--help``; the failing examples fail with their message."""
    words = shlex.split(command)
    if words[1] == "-m":
        module = words[2]
        with pytest.raises(SystemExit) as exited:
            importlib.import_module(module).main(["--help"])
        assert exited.value.code == 0
        return
    assert Path(words[1]).name == "run.py", command
    args = words[2:]
    if command in FAILING:
        ended = preflight(*args)
        assert ended.returncode == 2 and ended.stderr.startswith(FAILING[command])
        return
    if any(a.startswith("--") for a in args):  # run.py's own flags (--help) are tested in test_run
        return
    for job in run_py_jobs(args):
        compose_config(*job)
