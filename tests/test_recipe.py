"""recipe/compute_optimal.py: the fit, the recommendation and the frontier on synthetic numbers;
sizes; cached runs."""
import json
import math
import os

import pytest
import torch

from recipe import compute_optimal
from test_tuning import tiny_llama, inputs, embedding, L, H


def result(tuning, size, budget, eval_loss, spearman=0.5, per_token=100.0):
    return {
        "tuning": tuning, "size": size, "budget": budget, "eval_loss": eval_loss,
        "spearman": spearman, "flops_per_token": per_token, "N": 1000, "N_trainable": 10,
        "steps": 1, "tokens_seen": 10, "train_loss_last10": 1.0, "seconds": 1.0, "layers": 1,
        "hidden": 64}


def synthetic_grid():
    """Full is better at small budgets and LoRA at large ones (lines that cross at 1e12), as in the
    paper."""
    budgets = [1e10, 1e11, 1e12, 1e13, 1e14]
    rows = [result("full", "s", b, 3.0 - 0.1 * math.log10(b), per_token=600.0) for b in budgets]
    rows += [result("lora", "s", b, 3.6 - 0.15 * math.log10(b), per_token=420.0) for b in budgets]
    rows += [
        result("lora", "big", b, 5.0 - 0.2 * math.log10(b) + 0.5, per_token=900.0)
        for b in budgets[:2]]
    rows += [result("full", "s", 0.0, 4.0)]  # untrained: never fitted
    return rows


def test_fit_line_recovers_a_line_in_log_budget():
    f = compute_optimal.fit_line([1e10, 1e11, 1e12], [2.0, 1.5, 1.0])
    assert f["a"] == pytest.approx(7.0) and f["b"] == pytest.approx(
        -0.5) and f["r2"] == pytest.approx(1.0)
    noisy = compute_optimal.fit_line([1e10, 1e11, 1e12, 1e13], [2.0, 1.4, 1.1, 0.4])
    assert 0.9 < noisy["r2"] < 1.0 and noisy["points"] == 4
    with pytest.raises(ValueError, match="two distinct budgets"):
        compute_optimal.fit_line([1e10, 1e10], [1.0, 2.0])


def test_fit_all_fits_each_method_and_size_over_trained_runs():
    fits = compute_optimal.fit_all(synthetic_grid(), "eval_loss")
    assert set(fits) == {("full", "s"), ("lora", "s"), ("lora", "big")}
    assert fits[("full", "s")]["a"] == pytest.approx(3.0) and fits[(
        "full", "s")]["b"] == pytest.approx(-0.1)
    assert fits[("full", "s")]["points"] == 5  # the untrained budget-0 row is left out
    assert (fits[("lora", "big")]["low"], fits[("lora", "big")]["high"]) == (1e10, 1e11)


def test_recommendation_follows_the_crossing_of_the_fits():
    rows = synthetic_grid()
    fits = compute_optimal.fit_all(rows, "eval_loss")
    low = compute_optimal.recommend(rows, fits, 1e10, "eval_loss")
    high = compute_optimal.recommend(rows, fits, 1e14, "eval_loss")
    assert (low["tuning"], low["size"]) == ("full", "s") and low["predicted"] == pytest.approx(2.0)
    assert (high["tuning"], high["size"]) == ("lora",
                                              "s") and high["predicted"] == pytest.approx(1.5)
    assert high["tokens"] == pytest.approx(1e14 / 420.0) and high["flops_per_token"] == 420.0
    assert not high["extrapolated"] and compute_optimal.recommend(rows, fits, 1e16,
                                                                  "eval_loss")["extrapolated"]
    # big's runs stop at 1e11
    assert [r[:2] for r in high["ranking"]] == [("lora", "s"), ("full", "s")]
    assert ("lora", "big") in [r[:2] for r in low["ranking"]]


def test_higher_is_better_metric_picks_the_maximum():
    rows = [result("full", "s", b, 1.0, spearman=0.1 * math.log10(b)) for b in (1e10, 1e12)]
    rows += [result("lora", "s", b, 1.0, spearman=0.5) for b in (1e10, 1e12)]
    fits = compute_optimal.fit_all(rows, "spearman")
    assert compute_optimal.recommend(rows, fits, 1e12, "spearman")["tuning"] == "full"  # 1.2 > 0.5
    assert compute_optimal.recommend(rows, fits, 1e10, "spearman")["tuning"] == "full"  # 1.0 > 0.5
    assert compute_optimal.recommend(rows, fits, 1e2, "spearman")["tuning"] == "lora"  # 0.2 < 0.5


def test_frontier_keeps_each_methods_best_size_and_the_winner():
    frontier = compute_optimal.best_per_budget(synthetic_grid(), "eval_loss")
    assert list(frontier) == [1e10, 1e11, 1e12, 1e13, 1e14]
    assert frontier[1e10]["lora"][0] == "s"  # s (2.1) beats big (3.5)
    win = compute_optimal.winners(frontier, "eval_loss")
    assert win[1e10] == "full" and win[1e14] == "lora"


def test_report_has_the_grid_fits_and_recommendation():
    rows = synthetic_grid()
    fits = compute_optimal.fit_all(rows, "eval_loss")
    text = compute_optimal.report(rows, fits,
                                  compute_optimal.recommend(rows, fits, 1e14, "eval_loss"),
                                  "eval_loss", "python -m recipe.compute_optimal", 1.0)
    assert "| full | s | 3.0000 | -0.1000 | 1.000 | 5 | 1e+10..1e+14 |" in text
    assert "**lora** on **s**" in text and "(untrained)" in text
    assert len([
        line for line in text.splitlines()
        if line.startswith("| s |") or line.startswith("| big |")]) == 13


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = synthetic_grid()
    path = compute_optimal.plot(rows, compute_optimal.fit_all(rows, "eval_loss"), "eval_loss",
                                str(tmp_path / "recipe.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_parse_size_and_bad_sizes():
    assert compute_optimal.parse_size("smollm2-135m:4") == ("smollm2-135m", 4)
    assert compute_optimal.parse_size("random:2x128") == ("random", (2, 128))
    for bad in ("smollm2-135m", "smollm2-135m:0", "random:2x100", "gpt2:3", "random:x64"):
        with pytest.raises(ValueError, match="cannot read size"):
            compute_optimal.parse_size(bad)


def test_first_blocks_equal_the_full_model_cut_at_layer_k():
    model, (ids, mask) = tiny_llama(), inputs()
    small = compute_optimal.first_blocks(model, 2)
    assert small.config.num_hidden_layers == 2 and len(small.layers) == 2 and len(model.layers) == L
    with torch.no_grad():
        import starbucks as sb
        # final norm applied at layer 2
        expected = sb.embed_2d(model, ids, mask, [(2, H)], "mean")[(2, H)]
        torch.testing.assert_close(
            sb.embed_2d(small, ids, mask, [(2, H)], "mean")[(2, H)], expected)
        embedding(model, ids, mask)  # the full model still runs all its layers


def test_random_llama_shape():
    model = compute_optimal.random_llama(2, 128, vocab_size=100)
    assert (model.config.num_hidden_layers, model.config.hidden_size,
            model.config.num_attention_heads) == (2, 128, 2)


def test_grid_reuses_finished_runs(tmp_path, monkeypatch):
    opts = compute_optimal.parse_args([
        "--output_dir",
        str(tmp_path), "--sizes", "random:1x64", "--tunings", "full", "--budgets", "1e9,2e9"])
    for budget in (0.0, 1e9, 2e9):
        folder = tmp_path / "runs" / compute_optimal.run_name("random:1x64", "full", budget)
        os.makedirs(folder)
        json.dump(result("full", "random:1x64", budget, 1.0), open(folder / "result.json", "w"))
    monkeypatch.setattr(compute_optimal, "run_one", lambda *a: pytest.fail("a finished run ran "
                                                                           "again"))
    monkeypatch.setattr(compute_optimal.data, "embedded_training_data", lambda **k: [])
    monkeypatch.setattr(compute_optimal, "held_out_pairs", lambda count: [])
    monkeypatch.setattr(compute_optimal.metrics, "lee_sts", lambda: None)
    results, skipped = compute_optimal.run_grid(opts)
    assert [r["budget"] for r in results] == [0.0, 1e9, 2e9] and skipped == []


def test_runs_over_the_step_cap_are_skipped_and_listed(tmp_path, monkeypatch, vocab_path):
    from transformers import BertTokenizer
    tokenizer = BertTokenizer(vocab=vocab_path)
    monkeypatch.setattr(compute_optimal.Sizes, "build", lambda self, size:
                        (tiny_llama(), tokenizer))
    opts = compute_optimal.parse_args([
        "--output_dir",
        str(tmp_path), "--sizes", "random:1x64", "--tunings", "lora", "--budgets", "1e15",
        "--max_steps_per_run", "5", "--eval_pairs", "32"])
    results, skipped = compute_optimal.run_grid(opts)
    assert [r["budget"] for r in results] == [0.0]  # the untrained model is still measured
    assert len(skipped) == 1 and skipped[0][:3] == ("random:1x64", "lora", 1e15)
    assert "over --max_steps_per_run 5" in skipped[0][3]
    assert not os.path.exists(
        tmp_path / "runs" / compute_optimal.run_name("random:1x64", "lora", 1e15) / "result.json")


def test_bad_grid_flags_are_clear_errors():
    for argv in (["--budgets", "0,1e9"], ["--tunings", "prefix"], ["--sizes", "gpt2:2"],
                 ["--tunings", "bias", "--learning_rates", "full=1e-4"]):
        with pytest.raises(SystemExit):
            compute_optimal.parse_args(argv)
