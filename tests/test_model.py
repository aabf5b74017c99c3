import pytest
import torch

from gptstack.model import ModelConfig
from gptstack.stages import RunConfig
from gptstack.model import GPT, KVCache

PUBLISHED = {  # parameters as published (GPT-1 paper: ~117M; GPT-2: 124M; GPT-3 Table 2.1)
    "gpt1": 117e6, "gpt2": 124e6, "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6,
    "gpt3-xl": 1.3e9, "gpt3-2.7b": 2.7e9, "gpt3-6.7b": 6.7e9, "gpt3-13b": 13.0e9, "gpt3-175b": 175.0e9,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_count_matches_paper(preset):
    cfg = RunConfig.resolve(preset)
    with torch.device("meta"):
        n = GPT(cfg.model).num_params()
    assert abs(n - PUBLISHED[preset]) / PUBLISHED[preset] < 0.02, f"{preset}: {n:,}"


def test_gpt1_is_post_norm_and_gpt3_pre_norm():
    assert RunConfig.resolve("gpt1").model.norm_position == "post"
    assert RunConfig.resolve("gpt3-small").model.norm_position == "pre"
    post = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=16, vocab_size=50, norm_position="post"))
    assert isinstance(post.ln_f, torch.nn.Identity)  # GPT-1 has no final LayerNorm


def _model(norm="pre", **kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_embd=32, n_head=4, n_ctx=32, vocab_size=61, norm_position=norm, **kw)).eval()


def test_output_is_tied_to_token_embedding():
    m = _model()
    h = m.hidden(torch.tensor([[1, 2, 3]]))
    assert torch.allclose(m.logits(h), h @ m.wte.weight.T)
    assert not any("lm_head" in n for n, _ in m.named_parameters())


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_kv_cache_gives_the_same_logits_as_a_full_forward(norm):
    m = _model(norm)
    idx = torch.randint(0, 61, (3, 20))
    full, _ = m(idx)
    cache = KVCache(m.cfg, 3, 20)
    parts = [m.logits(m.hidden(idx[:, :7], cache=cache))]
    for t in range(7, 20, 4):  # chunks after a prefill, as chat continues a conversation
        parts.append(m.logits(m.hidden(idx[:, t:t + 4], cache=cache)))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    m = _model()
    a = torch.randint(0, 61, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 61
    assert torch.allclose(m(a)[0][0, :10], m(b)[0][0, :10], atol=1e-6)
    assert not torch.allclose(m(a)[0][0, 10:], m(b)[0][0, 10:])


def test_ignored_targets_do_not_count():
    m = _model()
    x = torch.randint(0, 61, (2, 8))
    y = torch.randint(0, 61, (2, 8))
    masked = y.clone()
    masked[:, :4] = -100
    _, loss = m(x, masked)
    logits, _ = m(x)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), y[:, 4:].flatten())
    assert torch.allclose(loss, ref, atol=1e-6)


def test_context_overflow_is_an_error():
    m = _model()
    with pytest.raises(ValueError, match="exceeds the context"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_tiny_model_learns_a_pattern():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=2, n_embd=32, n_head=2, n_ctx=32, vocab_size=20)).train()
    data = torch.arange(33).remainder(7)[None].repeat(4, 1)  # a cycle of period 7
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = m(data[:, :-1], data[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.5 and loss.item() < 0.1
