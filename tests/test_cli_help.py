"""The command line answers `--help` and argument errors at once, and every option's help shows its default."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isofast.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_that_takes_a_value_shows_its_default(command):
    parser = _subcommands()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.required:
            continue  # positionals, flags (off unless given), required options
        text = formatter._expand_help(action)
        assert "default" in text, f"isofast {command} {action.option_strings[0]}: help {text!r} hides its default"
    if command == "train":
        assert "(default: 0.3)" in parser.format_help()  # the Iso-Diffusion default, said where users look


def _python(code_or_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)


def test_building_the_parser_imports_no_torch():
    # the cause of a slow --help: torch and the compiled ops take seconds to import
    proc = _python(["-c", "import sys; from isofast.cli import build_parser; build_parser(); "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "--steps", "zero", "--out", "x"]])
def test_help_and_argument_errors_answer_quickly(args):
    start = time.perf_counter()
    proc = _python(["-m", "isofast.cli", *args])
    elapsed = time.perf_counter() - start
    assert proc.returncode in (0, 2), proc.stderr
    assert elapsed < 3.0  # generous for a loaded machine: importing torch alone took ~3 s here, --help now ~0.2 s
