import pytest

from gptstack.errors import GptstackError
from gptstack.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "The quick brown fox.\n"] * 50


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=400)


@pytest.mark.parametrize("text", [
    "", "def f(x):\n\treturn  x\r\n", "naïve café — 日本語 🙂", "\x00\x01 bytes", "  leading and trailing  ",
    "a literal <|endoftext|> and <|end|> stay text",
])
def test_encode_decode_round_trips_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_literal_special_token_text_is_not_a_control_token(tok):
    ids = tok.encode("<|end|>")
    assert tok.special["<|end|>"] not in ids and len(ids) > 1


def test_every_special_token_is_reserved(tok):
    assert set(tok.special) == set(SPECIAL_TOKENS)
    assert len(set(tok.special.values())) == len(SPECIAL_TOKENS)
    for name, i in tok.special.items():
        assert tok.decode([i]) == name


def test_bpe_merges_common_strings(tok):
    assert len(tok.encode("def f(x):")) < len("def f(x):")


def test_save_load_same_ids(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.encode("return x + 1") == tok.encode("return x + 1")
    assert again.fingerprint() == tok.fingerprint()


def test_too_small_vocab_is_an_error():
    with pytest.raises(GptstackError, match="at least"):
        Tokenizer.train(TEXTS, vocab_size=100)


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptstackError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path / "tokenizer.json")
