"""The README and the guides in docs/ say what the code does: links resolve, every documented
command line parses with the real CLI, the short "try it" commands run, the README example runs."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

from otmdr.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def test_readme_starts_with_the_two_commands():
    commands = [line.strip() for line in _text(ROOT / "README.md").splitlines() if line.startswith("    ")]
    assert commands[:2] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _text(page)):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def _command_lines(text: str) -> list[str]:
    """``otmdr ...`` lines of code blocks (fenced or indented), continuations joined, comments cut."""
    lines, out, pending = text.splitlines(), [], ""
    in_fence = False
    for line in lines:
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        code = in_fence or line.startswith("    ")
        stripped = line.strip().removeprefix("$ ")
        if pending:
            stripped, pending = pending + " " + stripped, ""
        if not code or not stripped.startswith("otmdr "):
            continue
        if stripped.endswith("\\"):
            pending = stripped[:-1]
            continue
        out.append(stripped)
    return out


def _synopsis_argv(line: str, *, optional: bool = False) -> list[str]:
    """A documented command line as argv: comments and the other alternatives of ``a|b`` dropped
    (placeholders such as RUN_DIR stay: they are strings); the optional ``[--...]`` parts dropped,
    or with ``optional`` kept without their brackets (and without a repeat mark ``...``)."""
    line = re.sub(r"\s+#.*$", "", line)
    while True:  # optional parts, innermost first; not the brackets of YAML values like [0.05,0.1]
        shorter = re.sub(r"\s\[((?:-|RUN_)[^\[\]]*)\]", lambda m: " " + m.group(1).removesuffix(" ...") if optional
                         else "", line)
        if shorter == line:
            break
        line = shorter
    argv = shlex.split(line)[1:]
    argv = [token.split("|")[0] if "|" in token and not token.startswith("-") else token for token in argv]
    return ["1" if token == "N" else token for token in argv]  # a count's placeholder must parse as one


def test_every_documented_command_parses():
    """Each documented line parses as the real CLI's arguments twice: with its optional ``[...]``
    parts left out and with all of them given (so a documented option must exist)."""
    parser = build_parser()
    checked = with_optional = 0
    for page in PAGES:
        for line in _command_lines(_text(page)):
            variants = {tuple(_synopsis_argv(line)), tuple(_synopsis_argv(line, optional=True))}
            for argv in variants:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    try:
                        parser.parse_args(list(argv))
                    except SystemExit:
                        pytest.fail(f"{page.name}: documented command does not parse: {' '.join(argv)}\n"
                                    f"{err.getvalue()}")
            checked += 1
            with_optional += len(variants) - 1
    assert checked >= 15  # the synopsis and the guides' examples, not an empty extraction
    assert with_optional >= 9  # the synopsis's optional parts were checked too


def test_try_it_commands_run(tmp_path, monkeypatch):
    """The console block of docs/command-line.md, run as written, in order, in a fresh folder."""
    text = _text(ROOT / "docs" / "command-line.md")
    commands = [line[2:] for line in text.splitlines() if line.startswith("$ otmdr ")]
    assert len(commands) >= 5
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            code = main(shlex.split(command)[1:])
        assert code == 0, f"{command} -> {code}\n{out.getvalue()[-2000:]}\n{err.getvalue()[-2000:]}"
    assert (tmp_path / "runs" / "try" / "summary.json").is_file()
    assert (tmp_path / "runs" / "try" / "eval.json").is_file()
    assert (tmp_path / "runs" / "try-compare" / "report.md").is_file()


def test_readme_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", _text(ROOT / "README.md"), re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    torch.manual_seed(0)  # the example draws its data: fixed here so the bound below cannot flake
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    radius = float(re.search(r"radius .* = ([0-9.]+)", printed).group(1))
    assert 0.04 < radius <= 0.06 + 1e-6  # rho (0.02, 0.04), merged normalisation: at most rho1 + rho2
