"""The scripts' command-line conventions: every default shown by --help, a bad flag or input is one
line on stderr ('error: ...') and a non-zero exit code, never a traceback, and flag types that check
their range while parsing (before any model or data is loaded).
"""
import argparse
import copy
import math
import os
import re
import sys

# Module-level imports stay light (no torch): a script parses its flags and checks its paths first.

DEFAULT_MODEL = "all-MiniLM-L6-v2"  # the packaged encoder (models.PACKAGED_MODELS)
RUN_FILES = ("train_log.jsonl", "model.safetensors", "starbucks_config.json")  # what a run leaves
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default once: '(default: ...)' after its help,
    unless the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, one-line errors ('error: argument --flag: ...', exit code 2), and
    negative numbers as values: `--learning_rate -1e-4` reaches the range check."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("help") is None:  # argparse prints no line, so no default, for a flag without help
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def explicit_flags(parser, argv=None):
    """The dests of the flags that argv (default: sys.argv[1:]) gives, in any spelling (--kl=x, a
    prefix): parsed by a copy of the parser whose defaults are placeholders, those argv replaces."""
    unset = object()
    probe = copy.deepcopy(parser)
    probe.set_defaults(**{a.dest: unset for a in probe._actions if a.dest != argparse.SUPPRESS})
    parsed = probe.parse_known_args(argv)[0]
    return {dest for dest, value in vars(parsed).items() if value is not unset}


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


def output_dir_problem(output_dir, advice, resume=False, overwrite=False, source=None, empty=False,
                       held=RUN_FILES):
    """Why a run must not write into output_dir, or None; checked before any model or data is loaded.

    A file (or a path through one) is refused; so is the folder of the `source` model or one inside it,
    and a folder that holds it (overwriting would delete it); a folder that holds an earlier run's files
    (`held`, or checkpoints) is refused unless resume or overwrite, and with empty=True (export) any
    non-empty one. advice: what the script's flags offer then (each script names only its own flags)."""
    parent = os.path.abspath(output_dir)
    while parent and not os.path.exists(parent):  # the nearest existing ancestor must be a folder too
        parent = os.path.dirname(parent)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir) or not os.path.isdir(parent):
        blocking = output_dir if os.path.exists(output_dir) else parent
        return f"--output_dir {output_dir}: {blocking} is a file, not a folder"
    if source and os.path.exists(source):
        here = os.path.realpath(output_dir)
        there = os.path.realpath(source if os.path.isdir(source) else os.path.dirname(source))
        if here == there or here.startswith(there + os.sep):
            return (f"--output_dir {output_dir} is the source model's folder (or inside it): "
                    f"it would be overwritten")
        if there.startswith(here + os.sep) and not resume:  # overwriting would delete the start model
            return (f"--output_dir {output_dir} holds the model this run starts from ({source}): "
                    f"write the new run to another folder")
    if not os.path.isdir(output_dir) or resume or overwrite:
        return None
    names = os.listdir(output_dir)
    if empty and names:
        return f"--output_dir {output_dir} is not empty; {advice}"
    found = sorted(n for n in names if n in held or CHECKPOINT_NAME.match(n))
    if found:
        return f"--output_dir {output_dir} holds another run ({', '.join(found[:3])}); {advice}"
    return None
