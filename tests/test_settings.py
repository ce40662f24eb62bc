"""lapse.settings: every LAPSE_* environment variable, read in one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from _servers import REPO_ROOT

from lapse import settings
from lapse.cli import main

SRC = REPO_ROOT / "src" / "lapse"
CONFIGURATION = REPO_ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- settings: begin -->", "<!-- settings: end -->"


def test_unset_or_empty_is_the_default() -> None:
    """A variable that is unset, or set to nothing, reads as its default."""
    for setting in settings.SETTINGS:
        assert setting.get({}) == setting.default
        assert setting.get({setting.name: ""}) == setting.default


def test_values_are_parsed() -> None:
    """Each variable's parser: levels upper-cased, switches as booleans, the
    secret as bytes, URLs and tokens as given."""
    assert settings.LOG_LEVEL.check("debug") == "DEBUG"
    assert settings.GC_TUNING.check("0") is False and settings.GC_TUNING.check("1") is True
    assert settings.GC_TUNING.check("off") is False
    assert settings.LIVEVIEW_SECRET.check("0f" * 32) == b"\x0f" * 32
    assert settings.SESSION_STORE.check("sqlite:///x.db") == "sqlite:///x.db"
    assert settings.LIVEVIEW_TOKEN.check("a token") == "a token"


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (settings.LOG_LEVEL, "LOUD", "LAPSE_LOG_LEVEL='LOUD' is not a logging level"),
        (settings.GC_TUNING, "maybe", "LAPSE_GC_TUNING='maybe' is not 0 or 1"),
        (settings.LIVEVIEW_SECRET, "00" * 31, "the value set (62 characters) is not"),
        (settings.LIVEVIEW_SECRET, "zz" * 40, "LAPSE_LIVEVIEW_SECRET must be at least 64 hex"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(
    setting: settings.Setting[object], value: str, message: str
) -> None:
    """A value the parser refuses: a SettingError (a ValueError) naming the
    variable, and the value unless it is a secret."""
    with pytest.raises(settings.SettingError) as refused:
        setting.get({setting.name: value})
    assert message in str(refused.value)
    if setting.secret:
        assert value not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("LAPSE_GC_TUNING", "maybe"), ("LAPSE_LOG_LEVEL", "LOUD"), ("LAPSE_LIVEVIEW_SECRET", "12")],
)
def test_lapse_serve_says_which_variable_is_bad_and_exits_2(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lapse serve`` with a bad LAPSE_* value: exit 2 and one line naming the
    variable, before the application is imported."""
    monkeypatch.setenv(name, value)
    assert main(["serve", "nosuchmodule:site", "--app-dir", str(REPO_ROOT)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"lapse: error: {name}") and err.count("\n") == 1


def _environment_reads(path: Path) -> list[int]:
    """Lines of ``path`` that read the environment (os.environ[...],
    os.environ.get, os.getenv) rather than copy or write it."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            target = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value if node.func.attr == "get" else node.func
        else:
            continue
        text = ast.unparse(target)
        if text in ("os.environ", "environ", "os.getenv", "getenv"):
            lines.append(node.lineno)
    return lines


def test_every_environment_read_in_src_goes_through_settings() -> None:
    """No module of lapse but lapse.settings reads an environment variable."""
    reads = {
        str(path.relative_to(SRC)): lines
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "settings.py" and (lines := _environment_reads(path))
    }
    assert reads == {}


def test_reading_settings_loads_neither_the_reactor_nor_uvicorn() -> None:
    """``lapse`` reads its settings without importing the reactor or uvicorn."""
    code = (
        "import sys\n"
        "from lapse import settings\n"
        "import lapse.cli.sessions, lapse.cli.serve, lapse.cli.supervisor\n"
        "for setting in settings.SETTINGS:\n"
        "    setting.get()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('uvicorn', 'lapse.internet'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_the_reference_has_one_row_per_setting() -> None:
    """The rendered reference: a Markdown table, one row per variable, in order."""
    table = settings.render_table().splitlines()
    assert table[0] == "| variable | default | read by | what it does |"
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        f"`{setting.name}`" for setting in settings.SETTINGS
    ]


def _documented() -> str | None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def test_the_configuration_docs_hold_exactly_the_rendered_table() -> None:
    """docs/configuration.md, between the settings markers, is exactly
    ``settings.render_table()``: the reference cannot drift from the code."""
    assert _documented() == settings.render_table()
