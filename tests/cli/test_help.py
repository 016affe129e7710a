"""Every option of every subcommand says what it does and, where it has one, its
default; no command takes a token on its command line."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealserve.cli._connect import RefuseSecret
from sealserve.cli.main import build_parser, main


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction | RefuseSecret):
            yield path, parser, action


def _has_default(action: argparse.Action) -> bool:
    default = action.default
    if action.nargs == 0 or action.required:  # flags; required options have none to show
        return False
    return default not in (None, "", [], argparse.SUPPRESS)


ACTIONS = list(_walk(build_parser()))


def test_the_walk_sees_every_subcommand() -> None:
    from sealserve.cli.main import subcommands

    seen = {path[0] for path, _, _ in ACTIONS if path}
    assert {m.replace("_", "-") for m in subcommands()} <= seen


@pytest.mark.parametrize(
    ("path", "action"),
    [(p, a) for p, _, a in ACTIONS],
    ids=[
        " ".join((*p, a.option_strings[-1] if a.option_strings else a.dest)) for p, _, a in ACTIONS
    ],
)
def test_every_option_has_help_and_shows_its_default(
    path: tuple[str, ...], action: argparse.Action
) -> None:
    name = " ".join((*path, *action.option_strings[-1:])) or action.dest
    assert action.help and action.help != argparse.SUPPRESS, f"{name}: no help text"
    if _has_default(action):
        assert "%(default)" in action.help or "default" in action.help.lower(), (
            f"{name}: default {action.default!r} not shown in its help"
        )


@pytest.mark.parametrize("path", sorted({p for p, _, _ in ACTIONS if p}))
def test_help_renders(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    assert "%(" not in capsys.readouterr().out


def test_no_command_takes_a_token_on_its_command_line() -> None:
    offenders = [
        " ".join((*path, opt))
        for path, _, action in ACTIONS
        for opt in action.option_strings
        if opt.endswith("token") or opt.endswith("-jwt")
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "argv",
    [
        ["admin", "--target", "127.0.0.1:1", "--token", "eyJ.secret.x", "account", "a"],
        ["admin", "--target", "127.0.0.1:1", "--token=eyJ.secret.x", "account", "a"],
        ["redteam", "--target", "127.0.0.1:1", "--token", "eyJ.secret.x"],
        ["redteam", "--target", "127.0.0.1:1", "--admin-token", "eyJ.secret.x"],
        ["audit", "head", "--target", "127.0.0.1:1", "--token", "eyJ.secret.x"],
        [
            "watermark",
            "verify",
            "--ledger",
            "l",
            "--suspect-endpoint",
            "h:1",
            "--token",
            "eyJ.secret.x",
        ],
        ["broker", "list", "--broker", "h:1", "--admin-token", "eyJ.secret.x"],
    ],
)
def test_token_on_the_command_line_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "is not accepted: a token on the command line is visible" in err
    assert "-file FILE or $SEALSERVE_" in err
    assert "secret" not in err  # the value is never repeated


def test_a_prefix_of_token_is_not_taken_for_token_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["admin", "--target", "127.0.0.1:1", "--toke", "eyJ.secret.x", "account", "a"])
    assert exit_.value.code == 2
    assert "secret" not in capsys.readouterr().err


def test_the_token_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealserve.cli._connect import token_from

    args = build_parser().parse_args(["admin", "--target", "h:1", "account", "a"])
    monkeypatch.delenv("SEALSERVE_TOKEN", raising=False)
    assert token_from(args) is None
    monkeypatch.setenv("SEALSERVE_TOKEN", "from-env")
    assert token_from(args) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    args = build_parser().parse_args(
        ["admin", "--target", "h:1", "--token-file", str(tmp_path / "t"), "account", "a"]
    )
    assert token_from(args) == "from-file"


def test_demo_help_is_plain_text_and_current(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":class:" not in out and "`" not in out
    assert "suspended" in out  # the attack's account is suspended, not only throttled


def test_redteam_tier_is_the_attackers_tier(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["redteam", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "the attackers' tier" in out


def test_token_issue_offers_every_scope_the_server_checks() -> None:
    from sealserve.auth.principal import SCOPES
    from sealserve.cli.token import SCOPE_CHOICES

    assert set(SCOPE_CHOICES) == SCOPES
