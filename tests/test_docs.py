"""Every `dpokit ...` command line the README and the documentation show is one the real parser accepts, and every
ready recipe under configs/recipes/ is a valid --config file: a renamed or removed flag fails here, naming the file,
the line and the command.

Commands are taken from ```bash, ```sh, ```shell, ```console and bare ``` code blocks: `\\` continuations are
joined, lines are split on `&&`, `||`, `|` and `;`, leading environment assignments (`CUDA_VISIBLE_DEVICES=0`) and
`time` are skipped, redirections dropped, here-documents skipped; in a block whose lines start with `$ `, only
those lines are commands. `dpokit ARGS`, `python -m dpokit.cli ARGS` and `accelerate launch ... -m dpokit.cli.main
ARGS` forms are parsed with `dpokit.cli.main.build_parser().parse_args(ARGS)`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
MODULES = {"dpokit.cli", "dpokit.cli.main"}
REDIRECTIONS = {">", ">>", "<", "&>", ">&", "2>", "2>>", "1>"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def code_blocks(text: str):
    """(info string, [(line number, line)]) for each fenced code block of a markdown text."""
    block, info, fence = None, "", ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if block is None:
            match = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                block, fence, info = [], match.group(1), match.group(2).lower()
        elif stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            yield info, block
            block = None
        else:
            block.append((number, line))


def shell_lines(lines: list[tuple[int, str]]):
    """(line number, logical command line) of a shell block: continuations joined, comments and here-documents
    skipped; with `$ ` prompts, only the prompted lines."""
    prompted = any(line.lstrip().startswith("$ ") for _, line in lines)
    heredoc, pending, start = None, "", 0
    for number, line in lines:
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        text = line.strip()
        if not pending:
            if prompted:
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            if not text or text.startswith("#"):
                continue
            start = number
        match = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", text)
        if match:
            heredoc = match.group(1)
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        yield start, pending + text
        pending = ""
    if pending:
        yield start, pending


def commands(line: str) -> list[list[str]]:
    """The argument lists of the dpokit commands in one shell line (after `dpokit` or `-m dpokit.cli[.main]`)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    segments, current = [], []
    for token in tokens:
        if token in {"&&", "||", "|", ";", "&"}:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for segment in segments:
        words, skip = [], False
        for token in segment:  # redirections and their targets are not arguments
            if skip:
                skip = False
            elif token in REDIRECTIONS:
                skip = True
            else:
                words.append(token)
        while words and (ASSIGNMENT.match(words[0]) or words[0] in ("time", "env", "exec")):
            words.pop(0)
        if not words:
            continue
        if words[0] == "dpokit":
            found.append(words[1:])
            continue
        for i in range(len(words) - 1):
            if words[i] == "-m" and words[i + 1] in MODULES:
                found.append(words[i + 2:])
                break
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    """(FILE:LINE, argv) of every dpokit command shown in the README and docs/."""
    out = []
    for path in doc_files():
        for info, block in code_blocks(path.read_text(encoding="utf-8")):
            if info not in SHELL_BLOCKS:
                continue
            for number, line in shell_lines(block):
                if "dpokit" not in line:
                    continue
                try:
                    argvs = commands(line)
                except ValueError as error:  # unbalanced quotes
                    argvs = [["<unparsable shell line>", str(error)]]
                out += [(f"{path.relative_to(ROOT)}:{number}", argv) for argv in argvs]
    return out


COMMANDS = documented_commands()


def parse(argv: list[str]) -> tuple[int | None, str]:
    """Parse `argv` with a fresh parser (a --config file sets the parser's defaults); return (exit code, stderr)."""
    from dpokit.cli.main import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as stop:
            return (stop.code if isinstance(stop.code, int) else 1), err.getvalue()
    return None, err.getvalue()


def test_the_docs_show_commands():
    """The extraction finds the commands (a broken extractor would make the parse test vacuous)."""
    files = {where.split(":")[0] for where, _ in COMMANDS}
    assert len(COMMANDS) >= 40, COMMANDS
    assert "README.md" in files and any(f.startswith("docs/") for f in files)
    for command in ("dpo", "sft", "eval", "generate", "merge", "score", "rank", "winrate", "iterate", "demo",
                    "reproduce"):
        assert any(argv[:1] == [command] for _, argv in COMMANDS), f"no documented `dpokit {command}` command"


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # --config configs/recipes/... as the docs write it, from the repository root
    code, stderr = parse(argv)
    if code not in (None, 0):  # 0: --help / --version
        pytest.fail(f"{where}: `dpokit {shlex.join(argv)}` is rejected by the parser: {stderr.strip()}")


RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_is_a_valid_config(recipe):
    """A recipe's first line names its command (`# dpokit dpo ...` or `# dpokit sft ...`; dpo when it names none)."""
    head = recipe.read_text(encoding="utf-8").splitlines()[0]
    command = "sft" if head.startswith("# dpokit sft") else "dpo"
    argv = [command, "--config", str(recipe), "--model", "m", "--data", "d.jsonl", "--output", "o"]
    code, stderr = parse(argv)
    assert code is None, f"{recipe.relative_to(ROOT)}: {stderr.strip()}"
    from dpokit.cli.main import build_parser

    args = build_parser().parse_args(argv)
    import yaml

    values = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    for key, value in values.items():  # every key took effect (under its option's name)
        assert getattr(args, key.replace("-", "_")) == value, (recipe.name, key)
