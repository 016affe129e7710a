"""README stays current: the config reference matches the settings model, and every
subcommand is in the CLI tour."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_config_reference_is_current() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    assert out.stdout.strip() in readme, "run: python scripts/config_reference.py --write"


def test_every_subcommand_is_in_the_tour() -> None:
    from sealserve.cli.main import subcommands

    readme = (ROOT / "README.md").read_text()
    for module in subcommands():
        name = module.replace("_", "-")
        assert f"`sealserve {name}" in readme, f"README's CLI tour lacks `sealserve {name}`"


def test_the_tour_names_every_required_option() -> None:
    """A command's row shows what it cannot run without (replica-check's --ledger)."""
    import argparse

    from sealserve.cli.main import build_parser

    readme = (ROOT / "README.md").read_text()
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, parser in sub.choices.items():
        row = " ".join(
            line for line in readme.splitlines() if line.startswith(f"| `sealserve {name}")
        )
        for action in parser._actions:
            if action.required and action.option_strings:
                assert any(o in row for o in action.option_strings), (name, action.option_strings)
