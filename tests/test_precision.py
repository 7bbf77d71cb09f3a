"""index/precision.py: binary and int8 codes of the index, FAISS over them against brute force, the
funnel with a quantised first stage, the trade-off table."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from index import corpus_index as ci, precision
from conftest import assert_same_ranking
from test_corpus_index import build_index, shuffled_docids, trec_order

pytest.importorskip("faiss")


def coded_index(folder, num_docs=900, widths=None, shard_size=250, seed=0, normalize=True):
    """A random float32 index of {n: D_n} with its codes written."""
    g = torch.Generator().manual_seed(seed)
    vectors = {n: torch.randn(num_docs, d, generator=g) for n, d in (widths or {1: 32}).items()}
    index = build_index(folder, shuffled_docids(num_docs, seed), vectors, shard_size,
                        normalize=normalize)
    precision.write_codes(index, sample_rows=300)
    return precision.open_codes(index), vectors


def test_binary_codes_are_sign_bits_and_a_prefix_of_bytes_is_the_prefix_s_codes():
    x = np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32)
    codes = precision.binary_codes(x)
    assert codes.shape == (50, 5) and codes.dtype == np.uint8
    assert np.array_equal(np.unpackbits(codes, axis=1, bitorder="big"), x > 0)
    for d in (8, 16, 24):
        assert np.array_equal(codes[:, :d // 8], precision.binary_codes(x[:, :d]))
    assert precision.binary_codes(np.array([[1.0, -1, 0, 0, 0, 0, 0, 2]]))[0, 0] == 0b10000001


def test_int8_round_trip_is_within_half_a_step_clips_and_serves_every_prefix():
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((400, 16)).astype(np.float32)
    sample[:, 3] = 0.25  # a constant dimension: one value, kept exactly
    ranges = precision.int8_ranges(sample)
    assert np.array_equal(ranges, np.stack([sample.min(0), sample.max(0)]))
    codes = precision.int8_codes(sample, ranges)
    assert codes.dtype == np.int8 and codes.min() == -128 and codes.max() == 127
    step = (ranges[1] - ranges[0]) / 255
    error = np.abs(precision.int8_values(codes, ranges) - sample)
    assert (error <= step / 2 + 1e-6).all() and (error[:, 3] == 0).all()
    assert np.array_equal(precision.int8_codes(sample[:, :8], ranges), codes[:, :8])
    outside = precision.int8_codes(np.array([[100.0] * 16, [-100.0] * 16]), ranges)
    assert (outside[0, np.arange(16) != 3] == 127).all()
    assert (outside[1, np.arange(16) != 3] == -128).all()
    with pytest.raises(ValueError, match="finite"):
        precision.int8_ranges(np.array([[np.nan]]))


@pytest.mark.parametrize("d, depth", [(16, 30), (32, 900), (8, 5), (12, 40), (21, 900)])
def test_faiss_binary_search_equals_a_brute_force_hamming_search(tmp_path, d, depth):
    """Scores d - 2 Hamming are integers: compared exactly, ties (many at d=8) in trec_eval's
    order. d=12 and 21: the bits past d in the last byte never count."""
    codes, vectors = coded_index(str(tmp_path))
    queries = F.normalize(torch.randn(7, d, generator=torch.Generator().manual_seed(3)), dim=-1)
    scores, rows = precision.search_codes(codes, (1, d), "binary", queries, depth, query_block=3)
    docids = ci.docids(codes.index, torch.arange(900))
    doc_bits = vectors[1][:, :d].numpy() > 0  # (N, d)
    for i in range(7):
        hamming = (doc_bits != (queries[i].numpy() > 0)).sum(1)  # (N,)
        expected = trec_order(torch.from_numpy(d - 2 * hamming).float(), docids, depth)
        assert list(zip(ci.docids(codes.index, rows[i]), scores[i].tolist())) == expected


def test_int8_search_is_exact_search_over_the_dequantised_normalised_vectors(tmp_path):
    codes, vectors = coded_index(str(tmp_path), widths={2: 24})
    queries = F.normalize(torch.randn(9, 16, generator=torch.Generator().manual_seed(4)), dim=-1)
    found = precision.search_codes(codes, (2, 16), "int8", queries, 50)
    stored = np.concatenate([
        np.load(os.path.join(str(tmp_path), ci.shard_name(s), "codes-2-int8.npy"))
        for s in range(4)])
    values = F.normalize(torch.from_numpy(precision.int8_values(stored[:, :16], codes.ranges[2])),
                         dim=-1)
    expected = (queries @ values.T).topk(50, dim=1)
    assert_same_ranking(found, (expected.values, expected.indices), atol=1e-5)
    assert np.array_equal(stored, precision.int8_codes(vectors[2].numpy(), codes.ranges[2]))


def test_the_funnel_with_a_binary_stage_returns_the_float_rescoring_of_its_shortlist(tmp_path):
    codes, _ = coded_index(str(tmp_path), widths={1: 16, 3: 32})
    index, pairs, ks, depth = codes.index, [(1, 16), (3, 32)], [120], 20
    g = torch.Generator().manual_seed(5)
    stage_queries = [F.normalize(torch.randn(6, d, generator=g), dim=-1) for _, d in pairs]
    scores, rows = precision.quantized_funnel(codes, "binary", pairs, stage_queries, ks, depth)
    shortlist = precision.search_codes(codes, pairs[0], "binary", stage_queries[0], ks[0])[1]
    vectors = ci.read_rows(index, pairs[1], shortlist.reshape(-1)).view(6, ks[0], 32)
    rescored = torch.bmm(vectors, stage_queries[1].unsqueeze(2)).squeeze(2)  # (Q, 120)
    for i in range(6):
        expected = trec_order(rescored[i], ci.docids(index, shortlist[i]), depth)
        assert list(zip(ci.docids(index, rows[i]), scores[i].tolist())) == expected
    # an int8 first stage and a one-stage funnel are search_codes itself
    one = precision.quantized_funnel(codes, "int8", pairs[1:], stage_queries[1:], [], depth)
    assert torch.equal(one[1], precision.search_codes(codes, pairs[1], "int8", stage_queries[1],
                                                      depth)[1])


def test_write_codes_resumes_with_the_missing_files_and_open_codes_checks_them(tmp_path):
    codes, _ = coded_index(str(tmp_path), widths={1: 16, 2: 8})
    folder = str(tmp_path)
    path = os.path.join(folder, ci.shard_name(2), "codes-2-binary.npy")
    written = open(path, "rb").read()
    os.remove(path)
    with pytest.raises(ValueError, match="codes-2-binary.npy is missing"):
        precision.open_codes(codes.index)
    assert precision.write_codes(codes.index, sample_rows=300) == 1  # only the missing file
    assert open(path, "rb").read() == written
    assert precision.write_codes(codes.index, sample_rows=300) == 0
    with pytest.raises(ValueError, match="calibrated on 300 rows"):
        precision.write_codes(codes.index, sample_rows=50)
    other = build_index(str(tmp_path / "other"), ["a", "b"], {1: torch.ones(2, 8)}, 2)
    with pytest.raises(ValueError, match="no complete codes"):
        precision.open_codes(other)


def test_codes_of_vectors_written_again_are_refused_then_derived_afresh(tmp_path):
    """An index copied again into the same folder from other vectors: its old codes and int8
    ranges belong to the old vectors; open_codes refuses them, write_codes recalibrates."""
    docids = shuffled_docids(60)
    first = build_index(str(tmp_path / "a"), docids, {1: torch.randn(60, 16)}, 20)
    other = build_index(str(tmp_path / "b"), docids, {1: 10 * torch.randn(60, 16)}, 20)
    target = str(tmp_path / "half")
    precision.write_codes(ci.copy_index(first.folder, target, "float16"), sample_rows=30)
    old = precision.open_codes(ci.open_index(target)).ranges[1]
    index = ci.copy_index(other.folder, target, "float16")
    with pytest.raises(ValueError, match="derived from other vectors"):
        precision.open_codes(index)
    assert precision.write_codes(index, sample_rows=30) == 6  # 3 shards x binary, int8
    new = precision.open_codes(index).ranges[1]
    assert np.abs(new).max() > 5 * np.abs(old).max()
    assert np.array_equal(np.load(os.path.join(target, ci.shard_name(0), "codes-1-int8.npy")),
                          precision.int8_codes(np.load(os.path.join(
                              target, ci.shard_name(0), "layer-1.npy")), new))


def test_copying_to_float16_refuses_vectors_it_cannot_hold(tmp_path):
    vectors = torch.randn(10, 8)
    vectors[3, 2] = 1e6  # float16's largest is 65504
    full = build_index(str(tmp_path / "full"), shuffled_docids(10), {1: vectors}, 5)
    with pytest.raises(ValueError, match="layer 1's vectors of shard 0 are not finite in float16"):
        ci.copy_index(full.folder, str(tmp_path / "half"), "float16")


def test_calibration_sample_spreads_over_every_shard(tmp_path):
    codes, vectors = coded_index(str(tmp_path))
    sample = precision.calibration_sample(codes.index, 1, 300)
    assert np.array_equal(sample, vectors[1].numpy()[::3])


def test_bad_input_is_refused_in_one_line(tmp_path):
    codes, _ = coded_index(str(tmp_path), widths={1: 24})
    queries = F.normalize(torch.randn(2, 12), dim=-1)
    with pytest.raises(ValueError, match="precision 'int4'"):
        precision.search_codes(codes, (1, 12), "int4", queries, 5)
    with pytest.raises(ValueError, match="'float16' of an index stored in float32.*copy_index"):
        precision.search_codes(codes, (1, 12), "float16", queries, 5)
    assert precision.bytes_per_vector(12, "binary") == 2
    assert [precision.bytes_per_vector(384, p) for p in precision.PRECISIONS] == [1536, 768, 384,
                                                                                   48]


def test_copy_index_and_the_trade_off_table(tmp_path):
    g = torch.Generator().manual_seed(6)
    vectors = {1: torch.randn(300, 16, generator=g), 2: torch.randn(300, 32, generator=g)}
    docids = [f"d{i}" for i in range(300)]
    full = build_index(str(tmp_path / "f32"), docids, vectors, 100, normalize=True)
    half = ci.copy_index(full.folder, str(tmp_path / "f16"), "float16")
    assert half.dtype == "float16" and half.shard_rows == full.shard_rows
    assert np.array_equal(np.load(os.path.join(half.folder, ci.shard_name(1), "layer-2.npy")),
                          vectors[2][100:200].numpy().astype(np.float16))
    precision.write_codes(half)
    pairs = [(1, 12), (1, 16), (2, 32)]
    queries = {p: F.normalize(vectors[p[0]][:40, :p[1]] + 0.5 * torch.randn(40, p[1], generator=g),
                              dim=-1) for p in pairs}
    qids = [f"q{i}" for i in range(40)]
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(40)}
    results = precision.precision_results({"float32": full, "float16": half}, pairs, queries,
                                          qids, qrels, precision.PRECISIONS)
    assert list(results[(1, 12)]) == list(precision.PRECISIONS)
    assert results[(1, 12)]["binary"]["bytes"] == 2
    assert results[(2, 32)]["binary"]["bytes"] == 4 and results[(2, 32)]["float16"]["bytes"] == 64
    assert precision.kept(results, (2, 32), "float32", ((2, 32), "float32")) == 1
    assert 0.9 < precision.kept(results, (2, 32), "float16", ((2, 32), "float32")) < 1.1
    table = precision.format_table(results, (2, 32)).splitlines()
    assert len(table) == 2 + 4 + 4 + 4
    assert table[-4].startswith("| 2x32 | float32 | 128 |") and "| 1.0000 | 1.0000 | 1.0000 |" in \
        table[-4]
    compact = precision.format_compact(results).splitlines()
    assert compact[0] == "| nDCG@10 kept (bytes/vector) | 1x12 | 1x16 | 2x32 |"
    assert compact[3].startswith("| binary | ") and compact[3].endswith(" (4) |")
    assert " (2) | " in compact[3]
    int8_kept = precision.kept(results, (1, 16), "int8", ((1, 16), "float32"))
    assert f"{int8_kept:.4f} (16)" in compact[2]
    with pytest.raises(ValueError, match="need an index of that dtype"):
        precision.precision_results({"float16": half}, pairs, queries, qids, qrels, ["float32"])


# ----------------------------------------------------------------------------------------------
# The commands: evaluate.py --precision and python -m index.precision_table

def beir_folder(folder):
    """A small BEIR folder: 40 documents, 8 queries, one relevant document each."""
    (folder / "qrels").mkdir(parents=True)
    words = ["coffee", "tea", "milk", "water", "juice", "soda", "wine", "beer"] * 5
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i} about {w}"}) + "\n"
        for i, w in enumerate(words)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": w}) + "\n" for i, w in enumerate(words[:8])))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(8)))
    return folder


def test_evaluate_reports_every_pair_at_the_precision_beside_float(tmp_path, tiny_model_dir):
    """On a BEIR folder (indexed under --index_dir, float16 by default: the reference)."""
    import evaluate
    beir = beir_folder(tmp_path / "beir")
    out = str(tmp_path / "eval")
    results = evaluate.main(["--model_name_or_path", tiny_model_dir, "--names", "tiny", "--pairs",
                             "2x16,4x32", "--beir_dirs", str(beir), "--precision", "binary",
                             "--output_dir", out])
    by_pair = json.load(open(os.path.join(out, "results.json")))["precision"]["tiny"]["beir"]
    assert list(by_pair) == ["2x16", "4x32"]
    assert by_pair["4x32"]["float16"]["bytes"] == 64 and by_pair["4x32"]["binary"]["bytes"] == 4
    assert all(0 <= v[p][m] <= 1
               for v in by_pair.values() for p in v for m in ("nDCG@10", "R@100"))
    # the float16 column is the same search as evaluate's own figure
    assert by_pair["4x32"]["float16"]["nDCG@10"] == pytest.approx(
        results["tiny"]["beir"]["4x32"]["nDCG@10"], abs=1e-6)
    assert "beir at binary beside float16" in open(os.path.join(out, "table.txt")).read()
    evaluate.main(["--model_name_or_path", tiny_model_dir, "--names", "tiny", "--pairs", "2x12",
                   "--beir_dirs", str(beir), "--precision", "binary", "--output_dir",
                   str(tmp_path / "narrow")])  # 12 sign bits in 2 bytes
    by_pair = json.load(open(tmp_path / "narrow" / "results.json"))["precision"]["tiny"]["beir"]
    assert by_pair["2x12"]["binary"]["bytes"] == 2
    with pytest.raises(ValueError, match="indexed in float16 already, so it would be compared"):
        evaluate.main(["--model_name_or_path", tiny_model_dir, "--beir_dirs", str(beir),
                       "--precision", "float16", "--output_dir", str(tmp_path / "same")])


def test_the_precision_table_command_prints_every_pair_and_precision(tiny_model_dir, capsys):
    from index import precision_table
    results = precision_table.main(["--model_name_or_path", tiny_model_dir])
    printed = capsys.readouterr().out
    pairs = list(results)
    assert all(set(results[p]) == set(precision.PRECISIONS) for p in pairs)
    assert printed.count("\n| ") == 1 + sum(len(v) for v in results.values()) + 1 + 2
    assert "int8 nDCG@10 kept at the worst pair" in printed


def _precision_rank(rank, port, argv):
    """One of two gloo ranks running evaluate.py --precision, as torchrun starts it."""
    import evaluate
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    evaluate.main(argv)


def test_under_torchrun_rank_0_writes_the_codes_and_both_ranks_search_them(tmp_path,
                                                                           tiny_model_dir):
    import evaluate
    from test_corpus_index import _free_port
    beir = beir_folder(tmp_path / "beir")
    argv = ["--model_name_or_path", tiny_model_dir, "--names", "tiny", "--pairs", "2x16,4x32",
            "--beir_dirs", str(beir), "--precision", "binary", "--shard_size", "7"]
    torch.multiprocessing.spawn(_precision_rank, nprocs=2, args=(
        _free_port(), argv + ["--output_dir", str(tmp_path / "two")]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, so the same floats
    try:
        alone = evaluate.main(argv + ["--output_dir", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    two = json.load(open(tmp_path / "two" / "results.json"))
    one = json.load(open(tmp_path / "one" / "results.json"))
    assert two["precision"]["tiny"]["beir"].keys() == one["precision"]["tiny"]["beir"].keys()
    for pair, values in one["precision"]["tiny"]["beir"].items():
        for name, figures in values.items():
            found = two["precision"]["tiny"]["beir"][pair][name]
            assert found["nDCG@10"] == pytest.approx(figures["nDCG@10"], abs=1e-6)
            assert found["bytes"] == figures["bytes"]
    assert alone["tiny"]["beir"].keys() == one["results"]["tiny"]["beir"].keys()
    # the embedded set (in memory) is indexed in each process's scratch folder: refused under torchrun
    with pytest.raises(Exception, match="--precision under torchrun needs corpora read from files"):
        torch.multiprocessing.spawn(_precision_rank, nprocs=2, args=(_free_port(), [
            "--model_name_or_path", tiny_model_dir, "--precision", "int8", "--output_dir",
            str(tmp_path / "embedded")]))
