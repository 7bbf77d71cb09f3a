"""The scripts' command-line conventions: every default shown by --help, a bad flag or input is one
line on stderr ('error: ...') and a non-zero exit code, never a traceback, and flag types that check
their range while parsing (before any model or data is loaded).
"""
import argparse
import math
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and '(default: ...)' after every flag's help."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter and one-line errors: 'error: argument --flag: ...', exit code 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def run_command(main):
    """A script's entry point: main(); a bad input or setting (DataError, ValueError) ends the run with
    one line on stderr, 'error: ...', and exit code 1 instead of a traceback."""
    try:
        main()
    except ValueError as e:  # data.DataError is a ValueError
        sys.exit(f"error: {e}")


def checked_number(kind, ok, requirement):
    """An argparse type: text -> kind, finite, and ok(value), else 'must be <requirement>, got <value>'."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value
    return parse


positive_int = checked_number(int, lambda v: v >= 1, "at least 1")
non_negative_int = checked_number(int, lambda v: v >= 0, "0 (off) or positive")
positive_float = checked_number(float, lambda v: v > 0, "positive")
non_negative_float = checked_number(float, lambda v: v >= 0, "0 or positive")
fraction = checked_number(float, lambda v: 0 <= v < 1, "in [0, 1)")  # a ratio, e.g. --warmup_ratio


def bf16_problem(bf16):
    """Why --bf16 cannot be honoured on this machine, or None (bf16 autocast runs on CUDA GPUs only)."""
    import torch
    if bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return "--bf16 needs a CUDA GPU with bf16 support; this machine has none (drop the flag to train in fp32)"
    return None
