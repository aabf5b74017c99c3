"""Long context: window extension (extend.py, model.RopeScaling), chunked prefill, the retrieval probes and the
fine-tuning mix (evals/long_context.py, train/long_context.py)."""
import math

import pytest
import torch

from gptstack.checkpoint import load_model, save_state_dict
from gptstack.errors import GptstackError
from gptstack.evals.long_context import PASSKEY_INTRO, Haystacks, make_probe
from gptstack.extend import LEARNED_METHODS, ROPE_METHODS, extend, interpolate_table
from gptstack.generate import generate
from gptstack.model import GPT, ModelConfig, RopeScaling, ntk_base, rope_frequencies, rotary, yarn_attention_factor
from gptstack.tokenizer import Tokenizer

LEARNED = dict(n_layer=2, n_head=2, n_embd=32, n_ctx=16, vocab_size=64)
ROPE = dict(LEARNED, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, tie_embeddings=False)


def random_model(shape) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**shape))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("shape, method", [(LEARNED, m) for m in LEARNED_METHODS] + [(ROPE, m) for m in ROPE_METHODS])
def test_scale_factor_one_leaves_the_logits_unchanged(shape, method):
    model = random_model(shape)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    same = extend(model, model.cfg.n_ctx, method)
    assert torch.equal(logits(same, ids), logits(model, ids))


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_rope_scaling_at_factor_one_is_the_plain_rotary(kind):
    p = torch.arange(64)
    plain = rotary(p, 16, 10000.0, torch.float32)
    scaled = rotary(p, 16, 10000.0, torch.float32, RopeScaling(kind, 1.0, 64))
    assert all(torch.equal(a, b) for a, b in zip(plain, scaled))


def test_interpolated_rope_at_s_times_p_equals_the_original_at_p():
    s, p = 4, torch.arange(0, 50)
    cos, sin = rotary(p, 16, 10000.0, torch.float32)
    cos_s, sin_s = rotary(s * p, 16, 10000.0, torch.float32, RopeScaling("linear", float(s), 64))
    assert torch.allclose(cos_s, cos, atol=1e-5) and torch.allclose(sin_s, sin, atol=1e-5)


def test_interpolated_position_table_at_s_times_p_is_the_old_row_p():
    table = torch.randn(16, 8)
    longer = interpolate_table(table, 64)
    assert torch.equal(longer[4 * torch.arange(16)], table)
    assert torch.allclose(longer[4 * 3 + 2], (table[3] + table[4]) / 2)  # halfway between rows 3 and 4


def test_ntk_base_and_yarn_temperature_equal_the_published_formulas():
    # NTK-aware: b' = b · s^(d / (d - 2)); 10000 · 4^(64/62) = 41,829.37 (bloc97's post, YaRN paper eq. 16)
    assert ntk_base(10000.0, 64, 4.0) == pytest.approx(10000 * math.exp(64 / 62 * math.log(4)))
    assert ntk_base(10000.0, 64, 4.0) == pytest.approx(41829.37, abs=0.01)
    # NTK keeps the highest frequency and interpolates the lowest by exactly s
    inv, _ = rope_frequencies(64, 10000.0, RopeScaling("ntk", 4.0, 2048))
    plain, _ = rope_frequencies(64, 10000.0)
    assert inv[0] == plain[0] and float(inv[-1]) == pytest.approx(float(plain[-1]) / 4, rel=1e-5)
    # YaRN: sqrt(1/t) = 0.1 · ln(s) + 1 (Peng et al. 2023, eq. 22): s = 4 -> 1.1386, s = 16 -> 1.2773
    assert yarn_attention_factor(4.0) == pytest.approx(1.138629, abs=1e-6)
    assert yarn_attention_factor(16.0) == pytest.approx(1.277259, abs=1e-6)
    assert yarn_attention_factor(1.0) == 1.0
    _, factor = rope_frequencies(64, 10000.0, RopeScaling("yarn", 4.0, 2048))
    assert factor == yarn_attention_factor(4.0)


def test_yarn_frequencies_equal_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=576, num_attention_heads=9, max_position_embeddings=8192,
                                   rope_parameters={"rope_theta": 100000.0, "rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 2048})
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    ours, our_factor = rope_frequencies(64, 100000.0, RopeScaling("yarn", 4.0, 2048))
    assert torch.allclose(ours, theirs) and our_factor == pytest.approx(their_factor)


def test_forward_past_a_learned_window_is_an_error_before_extension_and_runs_after():
    model = random_model(LEARNED)
    ids = torch.randint(0, 64, (1, 40))
    with pytest.raises(ValueError, match="sequence of 40 tokens exceeds the context of 16 .*gptstack extend"):
        model(ids)
    with pytest.raises(ValueError, match="prompt of 40 tokens leaves no room in the context of 16"):
        generate(model, [ids[0].tolist()], 4, temperature=0.0)
    longer = extend(model, 64, "interpolate")
    assert longer(ids)[0].shape == (1, 40, 64)
    assert len(generate(longer, [ids[0].tolist()], 4, temperature=0.0)[0].tokens) == 4


def test_extend_refuses_a_method_of_the_other_position_kind_and_a_shorter_window():
    with pytest.raises(GptstackError, match="learned positions extends by interpolate, tile"):
        extend(random_model(LEARNED), 64, "yarn")
    with pytest.raises(GptstackError, match="rope positions extends by none, linear, ntk, yarn"):
        extend(random_model(ROPE), 64, "tile")
    with pytest.raises(GptstackError, match="shorter than the model's window of 16"):
        extend(random_model(LEARNED), 8, "tile")


def test_rope_scaling_is_saved_with_the_model_and_composes(tmp_path):
    model = extend(random_model(ROPE), 64, "yarn")
    save_state_dict(model.state_dict(), tmp_path / "model.safetensors", model.metadata())
    back = load_model(tmp_path)
    assert back.cfg.rope_scaling == RopeScaling("yarn", 4.0, 16)
    ids = torch.randint(0, 64, (1, 60))
    assert torch.equal(logits(back, ids), logits(model, ids))
    assert extend(back, 128, "linear").cfg.rope_scaling == RopeScaling("linear", 8.0, 16)  # counted from the trained 16


@pytest.mark.parametrize("shape", [LEARNED, ROPE], ids=["learned", "rope"])
def test_chunked_prefill_answers_as_the_whole_prefill(shape):
    model = extend(random_model(shape), 64, "interpolate" if shape is LEARNED else "yarn")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (37, 21, 30)]  # ragged: left-padded
    whole = generate(model, prompts, 8, temperature=0.0)
    for chunk in (5, 16):
        chunked = generate(model, prompts, 8, temperature=0.0, prefill_chunk=chunk)
        assert [c.tokens for c in chunked] == [w.tokens for w in whole]
        assert all(a == pytest.approx(b, abs=1e-4) for c, w in zip(chunked, whole) for a, b in zip(c.logprobs, w.logprobs))


@pytest.fixture(scope="module")
def tok():
    text = ("The grass is green. The sky is blue. The pass key is 12345. What is the special magic number for apple? "
            "def f(x): return x + 1\n") * 40
    return Tokenizer.train([text], vocab_size=320)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_probe_fits_its_length_and_hides_the_key_at_its_depth(tok, depth):
    p = make_probe("passkey", tok, 600, depth, "test", 0)
    assert 580 < len(p.prompt) + len(p.answer_ids) <= 600
    text = tok.decode(p.prompt)
    fact = f" The pass key is {p.answer}. Remember it. {p.answer} is the pass key."
    assert text.startswith(PASSKEY_INTRO) and text.endswith(" What is the pass key? The pass key is")
    before, after = text[len(PASSKEY_INTRO):].split(fact)
    sentences_before, sentences_after = before.count("."), after.count(".")
    assert sentences_before + sentences_after > 20
    assert sentences_before / (sentences_before + sentences_after) == pytest.approx(depth, abs=0.05)


def test_probes_of_each_split_differ_and_repeat(tok):
    keys = {split: [make_probe("passkey", tok, 200, 0.5, split, i).answer for i in range(8)] for split in ("train", "dev", "test")}
    assert not set(keys["dev"]) & set(keys["test"]) and not set(keys["train"]) & set(keys["test"])
    assert keys["test"] == [make_probe("passkey", tok, 200, 0.5, "test", i).answer for i in range(8)]


def test_needle_hides_its_fact_in_the_split_haystack(tok):
    hay = Haystacks(tok, {"train": ["x = 1\n" * 200], "dev": ["y = 2\n" * 200], "test": ["def f(x): return x\n" * 100]})
    p = make_probe("needle", tok, 200, 0.25, "test", 0, haystacks=hay)
    text = tok.decode(p.prompt)
    assert "return x" in text and "y = 2" not in text and f"is {p.answer}." in text
    with pytest.raises(ValueError, match="too few for a 5000-token haystack"):  # not ProbeDoesNotFit: a grid stops here
        make_probe("needle", tok, 5000, 0.25, "test", 0, haystacks=hay)


def test_extend_cli_writes_a_longer_model_folder_and_names_a_wrong_method(random_model_dir, tmp_path):
    from conftest import run_cli
    out = tmp_path / "long"
    proc = run_cli("extend", "--model", random_model_dir, "--ctx", 256, "--method", "interpolate", "--out", out)
    assert proc.returncode == 0, proc.stderr
    model, base = load_model(out), load_model(random_model_dir)
    assert model.cfg.n_ctx == 256 and (out / "tokenizer.json").is_file()
    assert torch.equal(model.wpe.weight[::256 // base.cfg.n_ctx], base.wpe.weight)
    proc = run_cli("extend", "--model", random_model_dir, "--ctx", 256, "--method", "yarn", "--out", tmp_path / "x")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("extends by interpolate, tile")
    proc = run_cli("eval", "long-context", "--model", out, "--lengths", "128", "--task", "passkey,haystack")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("unknown haystack (known: passkey, needle)")


def test_fine_tuning_batch_scores_the_answer_alone_in_retrieval_rows(tok):
    import numpy as np
    from gptstack.data.loader import TokenSampler
    from gptstack.data.tokens import TokenSplits
    from gptstack.train.long_context import LongContextObjective
    ids = np.asarray(tok.encode("def f(x): return x + 1\n" * 400), dtype=np.uint16)
    sampler = TokenSampler([TokenSplits("mem", ids, ids, 0, 0, 1, 0)], [1.0], 256, seed=0)
    hay = Haystacks(tok, {s: ["x = 1\n" * 400] for s in ("train", "dev", "test")})
    objective = LongContextObjective(sampler, tok, hay, 0.0, 1024, retrieval_fraction=0.5, min_length=240)
    batch = objective.train_batch(0, 16)
    rows = batch["retrieval"]
    assert 0 < rows.sum() < 16
    lm = sampler.train_batch(0, 16)
    assert torch.equal(batch["input"][~rows], lm["input"][~rows]) and torch.equal(batch["target"][~rows], lm["target"][~rows])
    for r in rows.nonzero().flatten().tolist():
        scored = (batch["target"][r] != -100).nonzero().flatten()
        answer = batch["target"][r, scored].tolist()
        assert tok.decode(answer).strip().isdigit() and len(answer) == len(scored)
        assert torch.equal(batch["input"][r, scored[0] + 1:scored[-1] + 1], batch["target"][r, scored[:-1]])  # shifted by one


@pytest.mark.slow
def test_long_context_stage_writes_its_grids_keys_and_heat_maps(corpus, tmp_path):
    import json
    from conftest import TINY, run_cli
    run = tmp_path / "run"
    steps = ["long_context.retrieval_train.steps=4", "long_context.train.steps=4", "long_context.test_probes=1",
             "long_context.dev_probes=1", "long_context.train.batch_size=2", "long_context.retrieval_train.batch_size=2",
             "long_context.train.eval_tokens=1024", "long_context.retrieval_train.eval_tokens=1024"]
    proc = run_cli("pipeline", "--out", run, "--data", corpus, "--stages", "tokenizer,pretrain,long_context", *TINY,
                   "model.n_ctx=256", "pretrain.steps=10", "data.val_fraction=0.3", *steps, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((run / "report.json").read_text())["long_context"]
    assert (r["trained_ctx"], r["extended_ctx"], r["method"]) == (256, 1024, "interpolate")
    for task in ("passkey", "needle"):
        for when in ("trained", "before", "after"):
            grid = r[task][when]
            assert list(grid) == ["256", "512", "1024", "2048"] and all(list(row) == ["0", "25", "50", "75", "100"] for row in grid.values())
            assert all(v is None for v in grid["2048"].values())  # past the extended window
            assert all(v is None for v in grid["512"].values()) == (when == "trained")  # past the trained window
            assert all(0 <= v <= 1 for v in grid["256"].values())
        assert (run / "plots" / f"long_context_{task}.png").is_file()
    assert load_model(run / "long_context").cfg.n_ctx == 1024


def test_fine_tuning_eval_gives_accuracy_and_the_answers_log_probability_on_dev(tok):
    import numpy as np
    from gptstack.data.loader import TokenSampler
    from gptstack.data.tokens import TokenSplits
    from gptstack.train.long_context import LongContextObjective
    ids = np.asarray(tok.encode("def f(x): return x + 1\n" * 400), dtype=np.uint16)
    sampler = TokenSampler([TokenSplits("mem", ids, ids, 0, 0, 1, 0)], [1.0], 256, seed=0)
    hay = Haystacks(tok, {s: ["x = 1\n" * 400] for s in ("train", "dev", "test")})
    objective = LongContextObjective(sampler, tok, hay, 0.0, 512, retrieval_fraction=0.5, min_length=240, dev_probes=1)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_ctx=256, vocab_size=tok.vocab_size)).eval()
    out = objective.evaluate(model)
    assert out["dev_passkey"] == out["dev_needle"] == 0.0  # a random model retrieves nothing
    # a random model spreads its probability: about log(1/V) per answer token
    assert out["dev_answer_logprob"] == pytest.approx(-5 * math.log(tok.vocab_size), rel=0.3)
