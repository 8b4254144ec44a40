"""The one handler of user errors: one line and exit 2, the traceback on request, bugs untouched."""
from __future__ import annotations

import sys
import types

import pytest

from stepsearch import cli
from stepsearch.errors import UserError, report_user_errors


def _raise(error: BaseException):
    def body() -> int:
        raise error
    return body


def test_a_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("STEPSEARCH_DEBUG", raising=False)
    assert report_user_errors("prog", _raise(UserError("data.jsonl:3:\n  bad\trow"))) == 2
    assert capsys.readouterr().err == "prog: error: data.jsonl:3: bad row\n"
    assert report_user_errors("prog", lambda: 0) == 0


@pytest.mark.parametrize("value, shows", [("1", True), ("yes", True), ("0", False), ("", False), ("false", False)])
def test_the_debug_variable_shows_the_traceback(monkeypatch, capsys, value, shows):
    monkeypatch.setenv("STEPSEARCH_DEBUG", value)
    if shows:
        with pytest.raises(UserError, match="bad"):
            report_user_errors("prog", _raise(UserError("bad")))
    else:
        assert report_user_errors("prog", _raise(UserError("bad"))) == 2


def test_a_bug_is_not_a_user_error(monkeypatch):
    monkeypatch.delenv("STEPSEARCH_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        report_user_errors("prog", _raise(ZeroDivisionError("division by zero")))
    with pytest.raises(UserError):
        report_user_errors("prog", _raise(UserError("bad")), debug=True)


def test_the_dispatcher_catches_a_user_error_a_command_lets_through(monkeypatch, capsys):
    monkeypatch.delenv("STEPSEARCH_DEBUG", raising=False)
    module = types.ModuleType("stepsearch_fake_command")
    module.main = lambda argv: (_ for _ in ()).throw(UserError(f"bad argument {argv[0]}"))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "a command for this test"))
    assert cli.main(["fake", "x"]) == 2
    assert capsys.readouterr().err == "stepsearch fake: error: bad argument x\n"
    with pytest.raises(UserError):
        cli.main(["fake", "--debug"])
