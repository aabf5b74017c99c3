"""Scaling laws: the fits recover known constants, compute is counted as stated, the ladder plans and resumes."""
import math

import numpy as np
import pytest
import torch

from gptstack import scaling
from gptstack.stages import RunConfig
from gptstack.stages import scale as ladder
from gptstack.cli import main
from gptstack.model import ModelConfig
from gptstack.errors import GptstackError
from gptstack.io import atomic_write_json
from gptstack.model import GPT


# ---------------------------------------------------------------- L(C) = a·C^b + c

def _synthetic(a, b, c, C, noise, seed=0):
    rng = np.random.default_rng(seed)
    return scaling.power_law(C, a, b, c) * np.exp(rng.normal(0, noise, len(C)))


def test_power_law_fit_recovers_constants_within_1_percent():
    # compute in PF-day-like units (values near 1): a is then as well determined as b and c
    C = np.repeat(np.logspace(-4, 2, 7), 3)
    L = _synthetic(1.2, -0.12, 1.6, C, noise=1e-3)
    fit = scaling.fit_power_law(C, L)
    for k, true in (("a", 1.2), ("b", -0.12), ("c", 1.6)):
        assert abs(fit[k] / true - 1) < 0.01, (k, fit[k], true)


def test_power_law_fit_in_flops_units_predicts_beyond_the_points():
    # in raw FLOPs a trades off against b (a ∝ C0^-b), so check b, c and the extrapolated loss instead
    C = np.repeat(np.logspace(11, 15, 6), 3)
    L = _synthetic(40.0, -0.1, 1.8, C, noise=3e-4, seed=1)
    fit = scaling.fit_power_law(C, L)
    assert abs(fit["b"] / -0.1 - 1) < 0.01 and abs(fit["c"] / 1.8 - 1) < 0.01
    truth = scaling.power_law(1e16, 40.0, -0.1, 1.8)
    assert abs(scaling.power_law(1e16, fit["a"], fit["b"], fit["c"]) / truth - 1) < 1e-3


def test_bootstrap_interval_covers_the_truth_and_narrows_with_less_noise():
    C = np.repeat(np.logspace(-4, 0, 5), 3)
    groups = np.repeat(np.arange(5), 3)
    widths = []
    for noise in (3e-3, 3e-4):
        L = _synthetic(1.0, -0.2, 1.5, C, noise, seed=2)
        fit = scaling.fit_power_law(C, L)
        boot = scaling.bootstrap(C, L, groups, n=60)
        assert len(boot) == 60
        p = scaling.predict(fit, boot, 10.0)
        lo, hi = p["interval"]
        assert lo <= p["loss"] <= hi
        truth = scaling.power_law(10.0, 1.0, -0.2, 1.5)
        assert lo - 2 * (hi - lo) <= truth <= hi + 2 * (hi - lo)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ten times less noise: a much narrower interval


def test_power_law_fit_errors_are_clear():
    with pytest.raises(GptstackError, match="3 or more distinct compute"):
        scaling.fit_power_law([1e12, 1e12, 2e12], [3.0, 3.1, 2.9])
    with pytest.raises(GptstackError, match="positive, finite"):
        scaling.fit_power_law([1e12, 2e12, 3e12], [3.0, float("nan"), 2.9])
    with pytest.raises(GptstackError, match="positive number of FLOPs"):
        scaling.predict({"a": 1, "b": -0.1, "c": 1}, [], -5)


# ---------------------------------------------------------------- Chinchilla

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, eq. 10


def test_chinchilla_fit_recovers_constants_within_1_percent():
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 5), np.logspace(8, 11, 5)))
    L = scaling.chinchilla_loss(N, D, CHINCHILLA) * np.exp(np.random.default_rng(3).normal(0, 1e-4, len(N)))
    fit = scaling.fit_chinchilla(N, D, L)
    for k, true in CHINCHILLA.items():
        assert abs(fit[k] / true - 1) < 0.01, (k, fit[k], true)


def test_compute_optimal_is_the_minimum_along_the_budget():
    C = 1e21
    opt = scaling.compute_optimal(CHINCHILLA, C)
    assert math.isclose(6 * opt["params"] * opt["tokens"], C, rel_tol=1e-9)
    Ns = opt["params"] * np.logspace(-0.5, 0.5, 101)
    losses = scaling.chinchilla_loss(Ns, C / (6 * Ns), CHINCHILLA)
    assert abs(Ns[int(np.argmin(losses))] / opt["params"] - 1) < 0.03
    assert opt["loss"] <= losses.min() + 1e-12
    # Hoffmann et al.'s approach 3 gives ~1.8B parameters at 1e21 FLOPs (their table A3 lists 1.4B)
    assert 1e9 < opt["params"] < 3e9


def test_chinchilla_fit_needs_varied_tokens_per_parameter():
    N = np.array([1e6, 2e6, 4e6])
    with pytest.raises(GptstackError, match="tokens per parameter"):
        scaling.fit_chinchilla(N, 20 * N, [3.0, 2.8, 2.6])


# ---------------------------------------------------------------- capability

def test_capability_law_recovers_its_constants():
    C = np.logspace(10, 14, 6)
    n = np.full(6, 10**9)
    passed = np.round(np.exp(-3e3 * C ** -0.25) * n)
    fit = scaling.fit_capability(C, passed, n)
    assert abs(fit["k"] / 3e3 - 1) < 0.01 and abs(fit["b"] / -0.25 - 1) < 0.01
    assert abs(scaling.capability_pass_rate(fit, 1e15) - math.exp(-3e3 * 1e15 ** -0.25)) < 1e-3


# ---------------------------------------------------------------- compute counting and the plan

def test_compute_counted_with_and_without_embeddings():
    mc = ModelConfig(n_layer=2, n_head=3, n_embd=48, n_ctx=128, vocab_size=1024)
    counts = scaling.count_model(mc)
    m = GPT(mc)
    assert counts["params"] == m.num_params() and counts["params_non_embedding"] == m.num_params(embeddings=False)
    attn = 12 * 2 * 48 * 128
    assert counts["flops_per_token_non_embedding"] == 6 * counts["params_non_embedding"] + attn
    assert counts["flops_per_token_total"] == m.flops_per_token(128)  # the model's own count, incl. the unembedding
    assert counts["flops_per_token_total"] - counts["flops_per_token_non_embedding"] == 6 * 1024 * 48


def _cfg(*overrides):
    return RunConfig.resolve("tiny", [], list(overrides))


def test_plan_counts_tokens_seeds_and_checks_the_compute_ratio():
    rungs = ladder.plan(_cfg())
    target = rungs[-1]
    assert target.role == "target" and target.size == "L2-d128"
    fit = [r for r in rungs if r.role == "fit"]
    assert len(fit) == 7 * 2 and len({r.seed for r in fit}) == 2
    for r in fit:
        assert abs(r.tokens / (40 * r.counts["params_non_embedding"]) - 1) < 0.01
        assert r.tokens == r.steps * 16 * 128
        assert r.compute("non_embedding") <= 0.1 * target.compute("non_embedding")
    assert {r.tokens_per_param for r in rungs if r.role == "chinchilla"} == {10.0, 80.0}
    with pytest.raises(GptstackError, match="max_compute_ratio"):
        ladder.plan(_cfg("scale.target.n_embd=96"))
    with pytest.raises(GptstackError, match="at least 3 model sizes"):
        ladder.plan(_cfg("scale.rungs=[{n_layer: 2, n_embd: 48}, {n_layer: 3, n_embd: 48}]"))
    with pytest.raises(GptstackError, match="scale.n_head = 4 heads"):
        ladder.plan(_cfg("scale.rungs=[{n_layer: 2, n_embd: 42}, {n_layer: 3, n_embd: 48}, {n_layer: 4, n_embd: 48}]"))
    with pytest.raises(GptstackError, match="scale.head_dim = 16"):
        ladder.plan(_cfg("scale.n_head=0", "scale.target.n_embd=128"))  # 40 is no multiple of 16


def test_plan_from_widths_rule_and_presets():
    sizes = {r.size for r in ladder.plan(_cfg("scale.widths=[48, 64, 96]", "scale.aspect=32", "scale.target={preset: tiny}",
                                              "scale.n_head=0"))}
    assert sizes == {"L2-d48", "L2-d64", "L3-d96", "L4-d256"}


# ---------------------------------------------------------------- fit on a ladder folder, resume

def _fake_ladder(folder, cfg, law=(50.0, -0.09, 1.2)):
    """rung.json records of the planned fit rungs whose losses follow a known law exactly."""
    for r in ladder.plan(cfg):
        if r.role == "target":
            continue
        loss = float(scaling.power_law(r.compute("non_embedding"), *law)) * (1 + 1e-3 * (r.seed % 2))
        atomic_write_json(folder / "rungs" / r.name / "rung.json", {
            "name": r.name, "role": r.role, "size": r.size, "seed": r.seed, "params": r.counts["params"],
            "params_non_embedding": r.counts["params_non_embedding"], "tokens": r.tokens,
            "compute": {k: r.compute(k) for k in ladder.COMPUTE_KINDS}, "val_loss": loss,
            "capability": {"n": 100, "passed": 10, "pass_rate": 0.1}, "seconds": 1.0})


def test_fit_ladder_predicts_the_target_and_predict_reads_it(tmp_path):
    cfg = _cfg("scale.bootstrap=20")
    _fake_ladder(tmp_path, cfg)
    out = ladder.fit_ladder(cfg, tmp_path)
    target = ladder.plan(cfg)[-1]
    truth = scaling.power_law(target.compute("non_embedding"), 50.0, -0.09, 1.2)
    assert abs(out["prediction"]["loss"] / truth - 1) < 0.01
    p = ladder.predict_compute(tmp_path, target.compute("non_embedding"))
    assert p["loss"] == pytest.approx(out["prediction"]["loss"]) and p["interval"][0] <= p["loss"] <= p["interval"][1]
    assert "chinchilla_compute_optimal" not in p
    atomic_write_json(tmp_path / "fit.json", {**out, "chinchilla": CHINCHILLA})  # what `scale fit` adds
    co = ladder.predict_compute(tmp_path, 1e21)["chinchilla_compute_optimal"]
    assert co == scaling.compute_optimal(CHINCHILLA, 1e21)
    ext = ladder.extrapolation([r for r in ladder.records(tmp_path) if r["role"] == "fit"], None, "non_embedding", cfg.scale)
    assert len(ext) == 4 and all(e["distance"] > 1 and abs(e["relative_error"]) < 0.01 for e in ext)


def test_sizes_in_the_bigram_regime_are_not_fitted(tmp_path):
    cfg = _cfg("scale.bootstrap=0")
    _fake_ladder(tmp_path, cfg)
    recs = ladder.records(tmp_path)
    losses = sorted({r["val_loss"] for r in recs if r["role"] == "fit"}, reverse=True)
    atomic_write_json(tmp_path / "bigram.json", {"bigram_val_loss": (losses[1] + losses[2]) / 2})  # just above the smallest size
    used, excluded = ladder.fitted(cfg, tmp_path, recs)
    assert excluded == ["L2-d40"] and {r["size"] for r in used} == {f"L2-d{w}" for w in (44, 48, 52, 56, 60, 64)}
    assert ladder.fit_ladder(cfg, tmp_path)["fitted_runs"] == 12
    used, excluded = ladder.fitted(_cfg("scale.fit_below_bigram=false"), tmp_path, recs)
    assert excluded == [] and len(used) == 14
    atomic_write_json(tmp_path / "bigram.json", {"bigram_val_loss": 1.0})  # nothing beats it
    with pytest.raises(GptstackError, match="bigram regime"):
        ladder.fit_ladder(cfg, tmp_path)


def test_fit_ladder_needs_three_sizes(tmp_path):
    with pytest.raises(GptstackError, match="scale run"):
        ladder.fit_ladder(_cfg(), tmp_path)
    assert main(["scale", "predict", "--out", str(tmp_path), "--compute", "1e15"]) == 2


def test_finished_rung_is_skipped(tmp_path):
    cfg = _cfg()
    r = ladder.plan(cfg)[0]
    rec = {"name": r.name, "val_loss": 4.2}
    atomic_write_json(tmp_path / "rungs" / r.name / "rung.json", rec)
    # no tokenizer and no queries: a rung that were trained again would fail at once
    assert ladder.train_rung(cfg, tmp_path, r, tok=None, queries=None) == rec


def test_scale_plan_cli(capsys):
    assert main(["scale", "plan", "scale.seeds=1"]) == 0
    out = capsys.readouterr().out
    assert "L2-d128-tpp40-s1337" in out and "target" in out and "C no emb" in out


@pytest.mark.slow
def test_tiny_ladder_end_to_end(tmp_path, monkeypatch):
    """The scale stage on a ladder of seconds-long rungs: every artefact, the prediction before the target."""
    monkeypatch.setenv("GPTSTACK_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    cfg = _cfg("scale.rungs=[{n_layer: 1, n_embd: 16}, {n_layer: 1, n_embd: 32}, {n_layer: 2, n_embd: 32}]",
               "scale.target={n_layer: 2, n_embd: 96}", "scale.tokens_per_param=3", "scale.capability_queries=50",
               "scale.bootstrap=10", "scale.chinchilla_rungs=1", "scale.vocab_size=512", "scale.fit_below_bigram=false")
    from gptstack.pipeline import run_pipeline
    report = run_pipeline(cfg, tmp_path / "run", ["scale"])
    s = report["scale"]
    for k in ("a", "b", "c"):
        assert math.isfinite(s["fit"][k])
    assert s["predicted_before_training"] and s["compute_ratio"] > 10
    assert s["relative_error"] == pytest.approx((s["predicted_loss"] - s["actual_loss"]) / s["actual_loss"])
    assert (tmp_path / "run" / "plots" / "scaling.png").is_file()
    assert "Predictable scaling" in (tmp_path / "run" / "report.md").read_text()


def test_all_stages_leave_out_the_ladder(tmp_path, monkeypatch):
    import gptstack.pipeline as pipeline
    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, run, stages: seen.append(stages) or {})
    assert main(["pipeline", "--out", str(tmp_path), "--stages", "all"]) == 0
    assert main(["pipeline", "--out", str(tmp_path), "--stages", "scale"]) == 0
    assert "scale" not in seen[0] and "pretrain" in seen[0] and seen[1] == ["scale"]
