"""Hugging Face folders in and out: tiny random GPT-2 and Llama models built by transformers (nothing downloaded),
read into gptstack with the same logits, written back and loaded by transformers with the same logits again."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptstack.convert.hf import read_hf, write_hf
from gptstack.errors import GptstackError
from gptstack.model import GPT, ModelConfig

transformers = pytest.importorskip("transformers")

VOCAB = 300
EOT = "<|endoftext|>"
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}" + EOT + "{% endfor %}"


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE of VOCAB tokens, EOT first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, said the cat to the hat. " * 50], trainer)
    assert tok.get_vocab_size() == VOCAB
    return tok


def perturbed(model):
    """transformers' init leaves biases at 0 and norms at 1: make every tensor distinct so a mix-up shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_folder(model, bpe, folder, tokenizer_config, **save):
    model.save_pretrained(folder, **save)
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.fixture(scope="module")
def gpt2(bpe, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model, folder = perturbed(transformers.GPT2LMHeadModel(cfg)), tmp_path_factory.mktemp("gpt2")
    save_folder(model, bpe, folder, {"bos_token": EOT, "eos_token": EOT, "chat_template": CHAT})
    return model, folder


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama(request, bpe, tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, rope_theta=10000.0, max_position_embeddings=64,
                                   vocab_size=VOCAB, tie_word_embeddings=request.param, bos_token_id=0, eos_token_id=0)
    model, folder = perturbed(transformers.LlamaForCausalLM(cfg)), tmp_path_factory.mktemp("llama")
    # the untied one in shards, read through model.safetensors.index.json
    save_folder(model, bpe, folder, {"bos_token": {"content": EOT, "special": True}, "eos_token": EOT},
                **({} if request.param else {"max_shard_size": "50KB"}))
    (folder / "chat_template.jinja").write_text(CHAT)
    return model, folder


def ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))


def max_diff(hf_model, ours) -> float:
    with torch.no_grad():
        return (hf_model(ids()).logits - ours.logits(ours.hidden(ids()))).abs().max().item()


def roundtrip(imp, tmp_path):
    """write_hf of an imported model: transformers loads it with the same logits and tokens; read back, the same
    config and weights."""
    template = SimpleNamespace(jinja=imp.chat_template, bos=imp.bos, eos=imp.eos)
    out = tmp_path / "out"
    write_hf(imp.model, SimpleNamespace(hf=imp.tokenizer, template=template), out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    diff = max_diff(back, imp.model)
    assert diff < 1e-5, diff
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox said hello"
    assert tok.encode(text, add_special_tokens=False) == imp.tokenizer.encode(text).ids
    assert (tok.bos_token, tok.eos_token, tok.chat_template) == (EOT, EOT, CHAT)
    again = read_hf(out)
    assert again.model.cfg == imp.model.cfg
    mine, theirs = imp.model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    return back


def test_gpt2_imports_with_transformers_logits_and_exports_back(gpt2, tmp_path):
    model, folder = gpt2
    imp = read_hf(folder)
    cfg = imp.model.cfg
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings, cfg.n_ctx) == \
        ("learned", "layernorm", "gelu_tanh", True, True, 64)
    assert (imp.bos, imp.eos, imp.chat_template) == (EOT, EOT, CHAT)
    diff = max_diff(model, imp.model)
    assert diff < 1e-4, diff
    assert type(roundtrip(imp, tmp_path)).__name__ == "GPT2LMHeadModel"


def test_llama_imports_with_transformers_logits_and_exports_back(llama, tmp_path):
    model, folder = llama
    imp = read_hf(folder)
    cfg = imp.model.cfg
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.bias, cfg.kv_heads, cfg.mlp_hidden, cfg.rope_base, cfg.n_ctx) == \
        ("rope", "rmsnorm", "swiglu", False, 2, 96, 10000.0, 64)
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert (imp.bos, imp.eos, imp.chat_template) == (EOT, EOT, CHAT)
    diff = max_diff(model, imp.model)
    assert diff < 1e-4, diff
    assert type(roundtrip(imp, tmp_path)).__name__ == "LlamaForCausalLM"


def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))


def test_unknown_model_type_names_the_config(gpt2, tmp_path):
    folder = copy(gpt2[1], tmp_path)
    edit_config(folder, model_type="bert")
    with pytest.raises(GptstackError, match=r"config\.json: model_type 'bert'"):
        read_hf(folder)


def test_missing_weight_names_the_file_and_tensor(gpt2, tmp_path):
    folder = copy(gpt2[1], tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GptstackError, match=r"model\.safetensors: no tensor 'h\.1\.mlp\.c_fc\.weight'"):
        read_hf(folder)


def test_scaled_rotary_frequencies_are_refused(llama, tmp_path):
    folder = copy(llama[1], tmp_path)
    edit_config(folder, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0})
    with pytest.raises(GptstackError, match=r"config\.json: rope type 'llama3'"):
        read_hf(folder)


def test_export_names_the_switch_hugging_face_lacks(bpe, tmp_path):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=8, vocab_size=VOCAB, positions="rope"))  # LayerNorm
    with pytest.raises(GptstackError, match="norm='layernorm'.*LlamaForCausalLM"):
        write_hf(model, SimpleNamespace(hf=bpe), tmp_path / "out")


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}],
                         ids=["linear", "yarn"])
def test_rope_scaling_imports_with_transformers_logits_and_exports_back(llama, tmp_path, rope):
    folder = copy(llama[1], tmp_path)
    edit_config(folder, rope_parameters={"rope_theta": 10000.0, **rope})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    imp = read_hf(folder)
    s = imp.model.cfg.rope_scaling
    assert (s.type, s.factor) == (rope["rope_type"], 4.0)
    diff = max_diff(theirs, imp.model)
    assert diff < 1e-4, diff
    roundtrip(imp, tmp_path)


def test_ntk_scaling_exports_as_the_larger_base(llama, tmp_path):
    from gptstack.extend import extend
    from gptstack.model import ntk_base
    imp = read_hf(llama[1])
    longer = extend(imp.model, 4 * imp.model.cfg.n_ctx, "ntk")
    template = SimpleNamespace(jinja=imp.chat_template, bos=imp.bos, eos=imp.eos)
    write_hf(longer, SimpleNamespace(hf=imp.tokenizer, template=template), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters["rope_theta"] == pytest.approx(ntk_base(10000.0, 16, 4.0))
    diff = max_diff(back, longer)
    assert diff < 1e-5, diff
