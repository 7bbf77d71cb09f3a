"""data.py: every loader reads a fixture written in the exact public format; bad input gets its
error."""
import gzip
import json

import pytest

import data
import metrics
import models


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def test_tevatron_jsonl(tmp_path):
    rec = {"query_id": "1", "query": "what is coffee",
           "positive_passages": [{"docid": "7", "title": "Coffee", "text": "Coffee is a drink."}],
           "negative_passages": [{"docid": "8", "title": "", "text": "Tea is a drink."},
                                 {"docid": "9", "title": "Milk", "text": "Milk is white."}]}
    kind, records, skipped = data.read_training_file(
        write(tmp_path / "t.jsonl",
              json.dumps(rec) + "\n"))
    assert kind == "contrastive" and skipped == 0
    assert records == [{"query": "what is coffee", "positives": ["Coffee Coffee is a drink."],
                        "negatives": ["Tea is a drink.", "Milk Milk is white."]}]


def test_sentence_transformers_triplets_jsonl_and_tsv(tmp_path):
    line = {"anchor": "a man eats", "positive": "a person eats", "negative": "a cat sleeps"}
    kind, recs, _ = data.read_training_file(write(tmp_path / "t.jsonl", json.dumps(line) + "\n"))
    assert kind == "contrastive" and recs[0] == {
        "query": "a man eats", "positives": ["a person eats"], "negatives": ["a cat sleeps"]}
    kind, recs2, _ = data.read_training_file(
        write(tmp_path / "t.tsv", "anchor\tpositive\tnegative\n"
              "a man eats\ta person eats\ta cat sleeps\n"))
    assert recs2 == recs
    kind, pairs, _ = data.read_training_file(
        write(tmp_path / "p.tsv", "a man eats\ta person eats\n"))
    assert pairs[0]["negatives"] == []


def test_stsb_glue_tsv_sentence_transformers_tsv_gz_csv_and_jsonl(tmp_path):
    glue = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air "
        "plane is taking off.\t5.000\n1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA "
        "man is playing a flute.\tA man is playing a bamboo flute.\t3.800\n")
    a, b, s = metrics.read_sts_file(write(tmp_path / "sts-dev.tsv", glue))
    assert a[0] == "A plane is taking off." and b[
        1] == "A man is playing a bamboo flute." and s == [5.0, 3.8]
    st = ("split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2\n"
          "test\tmain-captions\tMSRvid\t2012test\t0000\t2.5\tA girl is styling her hair.\tA girl "
          "is brushing her hair.\n")
    path = tmp_path / "stsbenchmark.tsv.gz"
    path.write_bytes(gzip.compress(st.encode()))
    assert metrics.read_sts_file(str(path)) == (["A girl is styling her hair."], ["A girl is brushing "
                                                                               "her hair."], [2.5])
    csv_text = 'sentence1,sentence2,score\n"Hello, world",Hi world,4\n'
    assert metrics.read_sts_file(write(tmp_path / "s.csv", csv_text)) == (["Hello, world"], [
        "Hi world"], [4.0])
    jl = json.dumps({"sentence1": "x y", "sentence2": "y z", "score": 0.5}) + "\n"
    assert metrics.read_sts_file(write(tmp_path / "s.jsonl", jl))[2] == [0.5]
    headerless = "one two\tthree four\t1.5\n"
    assert data.read_training_file(write(tmp_path / "h.tsv", headerless))[0] == "scored"


def test_beir_folder(tmp_path):
    (tmp_path / "qrels").mkdir()
    write(tmp_path / "corpus.jsonl", json.dumps({"_id": "d1", "title": "T", "text": "body"}) + "\n"
          + json.dumps({"_id": "d2", "title": "", "text": "other"}) + "\n")
    write(tmp_path / "queries.jsonl", json.dumps({"_id": "q1", "text": "query one"}) + "\n"
          + json.dumps({"_id": "q2", "text": "unjudged"}) + "\n")
    write(tmp_path / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t2\n")
    corpus, queries, qrels = metrics.read_beir(str(tmp_path))
    assert corpus == {"d1": "T body", "d2": "other"} and queries == {
        "q1": "query one"} and qrels == {"q1": {"d1": 2}}


def test_msmarco_tsv_with_trec_qrels(tmp_path):
    c = write(tmp_path / "collection.tsv",
              "0\tThe presence of communication.\n1\tManhattan project.\n")
    q = write(tmp_path / "queries.dev.tsv", "1048585\twhat is paula deen's brother\n")
    r = write(tmp_path / "qrels.dev.tsv", "1048585\t0\t1\t1\n")
    corpus, queries, qrels = metrics.read_msmarco(c, q, r)
    assert corpus["1"] == "Manhattan project." and queries == {
        "1048585": "what is paula deen's brother"}
    assert qrels == {"1048585": {"1": 1}}
    space = write(tmp_path / "qrels.trec", "19335 0 1017759 0\n19335 0 1082489 1\n")
    assert metrics.read_qrels(space) == {"19335": {"1017759": 0, "1082489": 1}}


@pytest.mark.parametrize("content, message", [
    ('{"anchor": "a", "positive": "b"}\n{"anchor": "a", "positive"\n',
     r"t\.jsonl:2: not valid JSON"),
    ('{"query": "q", "positive_passages": [], "negative_passages": []}\n',
     r":1: query has no positive"),
    ('{"foo": 1}\n', r":1: unknown record layout"),
    ('{"anchor": "", "positive": "b"}\n', r":1: empty query"),
    ('[1, 2]\n', r":1: a JSON object was expected"),
    ('\n\n', r"file is empty"), ])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, content, message):
    with pytest.raises(data.DataError, match=message):
        data.read_training_file(write(tmp_path / "t.jsonl", content))


def test_bad_tsv_and_encoding(tmp_path):
    with pytest.raises(data.DataError, match=r"b\.tsv:2: 4 columns"):
        data.read_training_file(write(tmp_path / "b.tsv", "a\tb\na\tb\tc\td\n"))
    with pytest.raises(data.DataError, match=r"u\.tsv:2: not valid UTF-8"):
        data.read_training_file(write(tmp_path / "u.tsv", b"a\tb\n\xff\xfe\tc\n"))
    with pytest.raises(data.DataError, match="no such file"):
        data.read_training_file(str(tmp_path / "missing.tsv"))
    with pytest.raises(data.DataError, match=r"s\.tsv:2: score is not a number"):
        data.read_training_file(
            write(tmp_path / "s.tsv", "sentence1\tsentence2\tscore\na b\tc d\thigh\n"))
    with pytest.raises(data.DataError, match="needs scored pairs"):
        metrics.read_sts_file(write(tmp_path / "p.tsv", "a b\tc d\n"))
    with pytest.raises(data.DataError, match=r"q\.txt:1: 2 columns"):
        metrics.read_qrels(write(tmp_path / "q.txt", "q1 d1\n"))


def test_skip_bad_lines_counts_what_it_skipped(tmp_path):
    path = write(tmp_path / "t.jsonl",
                 '{"anchor": "a", "positive": "b"}\nnot json\n{"anchor": "c", "positive": "d"}\n')
    kind, records, skipped = data.read_training_file(path, skip_bad_lines=True)
    assert len(records) == 2 and skipped == 1
    with pytest.raises(data.DataError, match="no usable training records"):
        data.read_training_file(write(tmp_path / "all_bad.jsonl", "x\ny\n"), skip_bad_lines=True)


def test_model_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="not a model folder"):
        models.resolve_model_path(str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match="no config.json"):
        models.resolve_model_path(str(tmp_path))
    assert models.resolve_model_path("all-MiniLM-L6-v2").endswith("model")


# ---- the embedded real data ---------------------------------------------------------------------

def test_lee_sts_is_the_upper_triangle_of_50_documents():
    a, b, scores = metrics.lee_sts()
    assert len(a) == len(b) == len(scores) == 50 * 49 // 2
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert a[0] == data.lee_documents()[0] and b[0] == data.lee_documents()[1]


def test_wikipedia_text_is_clean_prose():
    articles = data.wikipedia_articles()
    assert len(articles) > 80
    text = " ".join(t for _, t in articles)
    for markup in ("[[", "{{", "'''", "<ref", "|}"):
        assert markup not in text
    assert "Anarchism" in [title for title, _ in articles]


def test_embedded_training_and_retrieval_sets_are_disjoint_and_well_formed():
    records = data.embedded_training_data(num_negatives=3)
    assert len(records) > 1000
    assert all(len(r["negatives"]) == 3 and r["query"] != r["positives"][0] for r in records)
    corpus, queries, qrels = metrics.embedded_retrieval_set()
    assert len(queries) == len(qrels) > 200 and all(len(j) == 1 for j in qrels.values())
    train_passages = {r["positives"][0] for r in records}
    assert not train_passages & set(corpus.values())
    # inverse cloze: the query sentence was cut out of its passage
    assert all(queries[q] not in corpus[next(iter(qrels[q]))] for q in queries)


def test_real_words_do_not_tokenize_to_unk():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(models.resolve_model_path("all-MiniLM-L6-v2"))
    ids = tok("The quick brown fox jumps over the lazy dog")["input_ids"]
    assert tok.unk_token_id not in ids


def test_streamed_corpora_equal_the_readers_dicts_in_file_order(tmp_path):
    (tmp_path / "qrels").mkdir()
    records = [{"_id": 7, "title": "T", "text": "body"}, {
        "_id": "d2", "title": "", "text": "line\u2028separator"}, {"_id": "é", "text": "accent"}]
    write(tmp_path / "corpus.jsonl", "".join(json.dumps(r) + "\n" for r in records) + "\n")
    write(tmp_path / "queries.jsonl", json.dumps({"_id": "q1", "text": "query one"}) + "\n"
          + json.dumps({"_id": "q2", "text": "unjudged"}) + "\n")
    write(tmp_path / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\t7\t2\n")
    corpus, queries, qrels = metrics.read_beir(str(tmp_path))
    assert list(metrics.stream_beir_corpus(str(tmp_path))) == list(corpus.items())
    assert metrics.read_beir_queries(str(tmp_path)) == (queries, qrels)
    collection = ("0\tThe presence of communication.\r\n1\tManhattan project.\textra column\n\n"
                  "2\ttrailing  \n")
    for name in ("collection.tsv", "collection.tsv.gz"):
        raw = gzip.compress(collection.encode()) if name.endswith(".gz") else collection
        c = write(tmp_path / name, raw)
        q = write(tmp_path / "queries.tsv", "1048585\twhat is paula deen's brother\n3\tunjudged\n")
        r = write(tmp_path / "qrels.tsv", "1048585 0 1 1\n")
        corpus, queries, qrels = metrics.read_msmarco(c, q, r)
        assert list(metrics.stream_msmarco_collection(c)) == list(corpus.items())
        assert metrics.read_msmarco_queries(q, r) == (queries, qrels)


@pytest.mark.parametrize("name, raw, message", [
    ("corpus.jsonl", b'{"_id": "1", "text": "a"}\n{"_id": "2", "te',
     r"corpus\.jsonl:2: the file ends in the middle"),
    ("corpus.jsonl", b'{"_id": "1", "text": "a"}\n{"text": "no id"}\n',
     r"corpus\.jsonl:2: a BEIR record needs '_id'"),
    ("corpus.jsonl", b'{"_id": "1", "text": "\xff"}\n', r"corpus\.jsonl:1: not valid UTF-8"),
    ("corpus.jsonl", b"\n\n", r"file is empty"),
    ("collection.tsv", b"0\tfine\nno tab here\n", r"collection\.tsv:2: expected id<TAB>text"),
    ("collection.tsv.gz", gzip.compress(b"0\tfine\n" * 1000)[:-30], r"damaged or cut-short gzip"),
])
def test_streamed_corpus_errors_name_file_and_line(tmp_path, name, raw, message):
    path = write(tmp_path / name, raw)
    stream = metrics.stream_beir_corpus(
        str(tmp_path)) if name == "corpus.jsonl" else metrics.stream_msmarco_collection(path)
    with pytest.raises(data.DataError, match=message):
        list(stream)
