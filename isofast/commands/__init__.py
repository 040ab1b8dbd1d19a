"""Subcommands of the `isofast` CLI, one module each (discovered by `isofast.cli`).

A command module imports only the standard library at its top: torch and the rest of isofast are
imported inside ``run``, so building the parser (``--help``, argument errors) never waits for them.
"""
from __future__ import annotations

import argparse
import sys


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The positional CHECKPOINT of the commands that read a trained run (`isofast.checkpoint.load_trained_model`
    takes each of these forms)."""
    parser.add_argument("checkpoint", help="a run folder, its checkpoints/ folder, or one step_XXXXXXX folder")


def show_progress(no_progress: bool) -> bool:
    """The one rule for every command's progress bars: drawn when stderr is a terminal, unless --no-progress.

    A pipe or a log file gets the commands' own lines instead of carriage-return bar redraws.
    """
    return not no_progress and sys.stderr.isatty()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and ends each option's help with its default.

    An option whose help already says its default (``default: ...``), a flag (off unless given), a required
    option and one without a default value (its help says what happens then) are left as written.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or not action.option_strings or action.required or unset or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"
