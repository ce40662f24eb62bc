"""The README and docs/ say what works: their code blocks, their commands, and
the install path they and lapse's error messages give.

The convention for a ```python block in README.md and docs/*.md, set by an
HTML comment on the line before its fence:

- ``<!-- doc: run -->``: a complete program; it is run in a subprocess (as a
  module, not ``__main__``, so a ``if __name__ == "__main__":`` server does
  not start) and must exit 0 within a short timeout;
- ``<!-- doc: file PATH -->``: the block is the file ``PATH`` of the
  repository exactly (which its own tests run, e.g. tests/test_examples_e2e.py);
- no comment: a fragment; it must compile.

In ```sh blocks every ``lapse ...`` command must name commands and options
that ``lapse`` has, every ``make X`` a target of the Makefile, every
``python PATH`` a file of the repository, and every ``pip install`` an
argument that installs (see :func:`install_problem`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from _servers import REPO_ROOT

from lapse.cli import build_parser

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[a-z]*)\s*$")
BUILD_TOOLS = {"build"}
"""Distributions the docs name for building, not installed with the tests
(``pip install build`` checked by hand)."""
MARK = re.compile(r"^\s*<!-- doc: (?P<what>run|file (?P<path>\S+)) -->\s*$")


@dataclass
class Block:
    """A fenced code block of a Markdown file."""

    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str  # dedented to the fence's indentation
    mark: str | None  # "run", "file PATH", or None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO_ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of ``doc``, in order."""
    found: list[Block] = []
    lines = doc.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None or not opening["lang"]:
            i += 1
            continue
        indent = opening["indent"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"{doc}:{i + 1}: a code block that never ends"
        body = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        previous = lines[i - 1] if i > 0 else ""
        mark = MARK.match(previous)
        found.append(Block(doc, i + 1, opening["lang"], body, mark["what"] if mark else None))
        assert indent == "" or body.strip(), f"{doc}:{i + 1}: an empty block"
        i = end + 1
    return found


ALL = [block for doc in DOCS for block in blocks(doc)]
PYTHON = [b for b in ALL if b.lang == "python"]
SHELL = [b for b in ALL if b.lang in ("sh", "bash", "shell")]


def test_the_docs_pages_exist_and_have_python_and_shell_blocks() -> None:
    """The README links every docs/ page, and there are blocks to check
    (so the tests below cannot pass by finding nothing)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for page in DOCS[1:]:
        assert f"](docs/{page.name})" in readme, f"the README does not link {page.name}"
    assert len(PYTHON) >= 10 and len(SHELL) >= 8
    assert sum(b.mark == "run" for b in PYTHON) >= 2
    assert sum(b.mark is not None and b.mark.startswith("file ") for b in PYTHON) >= 1


def test_relative_links_and_images_in_the_docs_point_at_files() -> None:
    """Every relative link or image (``](path)``, an anchor allowed) names a
    file that exists, relative to the page: moving text into docs/ broke none."""
    link = re.compile(r"\]\((?!https?:|mailto:|#)(?P<path>[^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for doc in DOCS:
        for found in link.finditer(doc.read_text(encoding="utf-8")):
            if not (doc.parent / found["path"]).exists():
                broken.append(f"{doc.relative_to(REPO_ROOT)}: {found['path']}")
    assert broken == []


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_compiles_or_runs_as_shown(block: Block, tmp_path: Path) -> None:
    """Every python block compiles; one marked ``run`` runs to exit 0; one
    marked ``file PATH`` is that file, character for character."""
    compile(block.text, block.where, "exec")
    if block.mark is None:
        return
    if block.mark.startswith("file "):
        path = REPO_ROOT / block.mark.removeprefix("file ")
        assert path.read_text(encoding="utf-8") == block.text, f"{block.where} differs from {path}"
        return
    script = tmp_path / "block.py"
    script.write_text(block.text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", f"import runpy; runpy.run_path({str(script)!r}, run_name='doc')"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, f"{block.where}:\n{done.stdout}\n{done.stderr}"


# -- shell commands -----------------------------------------------------------------


def makefile_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    return {m[1] for m in re.finditer(r"^([A-Za-z][\w-]*):", text, re.MULTILINE)}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def lapse_problem(args: list[str]) -> str | None:
    """Why ``lapse ARGS`` names a command or option lapse does not have, or None."""
    parser = build_parser()
    words = [a.strip("[]") for a in args]
    i = 0
    while i < len(words) and (commands := subparsers(parser)):
        if words[i].startswith("-"):
            break
        if words[i] not in commands:
            return f"no command {words[i]!r} (lapse has {sorted(commands)})"
        parser = commands[words[i]]
        i += 1
    options = {o for action in parser._actions for o in action.option_strings}
    for word in words[i:]:
        if word.startswith("-") and word.split("=")[0] not in options:
            return f"{parser.prog} has no option {word!r}"
    return None


def install_problem(args: list[str]) -> str | None:
    """Why ``pip install ARGS`` would not install what it says, or None.

    lapse is not on any index, so it is installed from a checkout (``.``,
    ``'.[extra]'``) or from a built wheel (``dist/lapse-VERSION-...whl``);
    any other name must be a real distribution (one of this environment's,
    or of BUILD_TOOLS).
    """
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    version = PYPROJECT["project"]["version"]
    for arg in args:
        if arg.startswith("-"):
            continue
        name, _, extra = arg.partition("[")
        wanted = {e.strip() for e in extra.rstrip("]").split(",")} if extra else set()
        if wanted - extras:
            return f"{arg}: no extra {sorted(wanted - extras)}"
        if name == ".":
            continue
        if name.endswith(".whl"):
            if not re.fullmatch(rf"(.*/)?lapse-{re.escape(version)}-py3-none-any\.whl", name):
                return f"{arg}: not the wheel python -m build makes"
            continue
        if name.lower() == "lapse":
            return f"{arg}: lapse is not on PyPI"
        if name in BUILD_TOOLS:
            continue
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return f"{arg}: no such distribution here"
    return None


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block: comments dropped, split at
    ``&&``, ``;``, ``|`` and ``&``, leading ``VAR=value`` words dropped."""
    found = []
    for line in text.splitlines():
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
        for part in re.split(r"&&|;|\||&(?=\s|$)", line):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words.pop(0)
            if words:
                found.append(words)
    return found


def command_problem(words: list[str]) -> str | None:
    """Why one documented command cannot work as written, or None."""
    program, args = words[0], words[1:]
    if program in ("python", "python3") and args[:2] == ["-m", "lapse"]:
        program, args = "lapse", args[2:]
    if program == "lapse":
        return lapse_problem(args)
    if program == "make":
        unknown = [a for a in args if "=" not in a and a not in makefile_targets()]
        return f"no make target {unknown}" if unknown else None
    if program in ("python", "python3") and args and args[0].endswith(".py"):
        return None if (REPO_ROOT / args[0]).is_file() else f"no file {args[0]}"
    if program == "pip" and args[:1] == ["install"]:
        return install_problem(args[1:])
    return None


@pytest.mark.parametrize("block", SHELL, ids=[b.where for b in SHELL])
def test_shell_block_names_commands_that_exist(block: Block) -> None:
    """Every ``lapse``, ``make``, ``python FILE`` and ``pip install`` command
    in a shell block names what exists (commands, options, targets, files,
    installable names)."""
    problems = [
        f"{shlex.join(words)}: {problem}"
        for words in commands(block.text)
        if (problem := command_problem(words)) is not None
    ]
    assert problems == [], block.where


def test_the_command_checks_catch_what_does_not_exist() -> None:
    """The checks above refuse a wrong command, option, target, file or
    install name (so a passing shell block means something)."""
    assert lapse_problem(["sessions", "list", "--full"]) is None
    assert lapse_problem(["serve", "x:y", "--port", "1", "--store", "memory:"]) is None
    assert lapse_problem(["sessions", "purge"]) is not None
    assert lapse_problem(["serve", "x:y", "--threads", "2"]) is not None
    assert command_problem(["make", "deploy"]) is not None
    assert command_problem(["python", "examples/nothing.py"]) is not None
    assert install_problem(["lapse[redis]"]) is not None
    assert install_problem([".[nothing]"]) is not None
    assert install_problem(["no-such-dist-lapse-test"]) is not None
    assert (
        install_problem([".[redis]", "hiredis", "dist/lapse-0.1.0-py3-none-any.whl[redis]"]) is None
    )


def test_every_install_command_in_an_error_message_installs() -> None:
    """The install commands lapse's own messages recommend (in src/) name
    what can be installed: lapse itself only from a checkout or a wheel."""
    said = re.compile(r"pip install ((?:'[^']+'|[\w.\[\],-]+)(?: (?:'[^']+'|[\w.\[\],-]+))*)")
    found = []
    for path in sorted((REPO_ROOT / "src").rglob("*.py")):
        for match in said.finditer(path.read_text(encoding="utf-8")):
            args = shlex.split(match[1])
            found.append(f"{path.name}: {match[0]}: {install_problem(args)}")
    assert found, "no install command found in src/"
    assert [line for line in found if not line.endswith(": None")] == []


# -- the install path ---------------------------------------------------------------


@pytest.mark.slow
def test_a_wheel_of_the_checkout_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    """The README's install path: a wheel built from the checkout installs
    into a new virtual environment, with the ``lapse`` command, ``py.typed``
    and the LICENSE, and lapse is then imported from there, not from src/.
    The dependencies come from this environment (no index needed for them)."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, checkout / name)
    shutil.copytree(
        REPO_ROOT / "src", checkout / "src", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            ".",
        ],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    version = PYPROJECT["project"]["version"]
    wheel = tmp_path / "dist" / f"lapse-{version}-py3-none-any.whl"
    assert wheel.exists(), sorted(p.name for p in (tmp_path / "dist").iterdir())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    import site

    # This environment's packages (uvicorn...) after the venv's own, not its .pth files.
    Path(site_dir, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            f"{wheel}[redis]",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    lapse = venv / "bin" / "lapse"
    ran = subprocess.run(
        [lapse, "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0 and ran.stdout.strip() == f"lapse {version}", ran
    probe = (
        "import importlib.metadata as m, pathlib, lapse; "
        "print(lapse.__file__); "
        "print((pathlib.Path(lapse.__file__).parent / 'py.typed').exists()); "
        "print(any(f.name == 'LICENSE' for f in m.distribution('lapse').files)); "
        # The package data: the stores read their SQL and Lua at import, the
        # live view its page.
        "import lapse.sessions.stores.sqlite, lapse.sessions.stores.redis; "
        "from lapse.web.liveview._page import page_template; "
        "print(page_template() is not None)"
    )
    out = subprocess.run(
        [python, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    where, typed, licensed, page = out.stdout.split()
    assert where.startswith(site_dir), where
    assert typed == "True" and licensed == "True" and page == "True"
