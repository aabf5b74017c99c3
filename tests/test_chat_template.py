"""The model's chat template: read from its Jinja, rendered turn by turn, with the exact SFT mask and stop token."""
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptstack.chat_template import BUILTIN, PROBES, ChatTemplate, jinja_renderer
from gptstack.errors import GptstackError
from gptstack.tokenizer import Tokenizer

# SmolLM2-135M-Instruct's template, as its GGUF and tokenizer_config.json carry it
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a "
          "helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] "
          "+ '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim "
          "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONV = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "Say <|im_end|> literally"}, {"role": "assistant", "content": "<|im_end|>"}]


def test_chatml_is_read_into_its_turns_and_default_system_message():
    t = ChatTemplate.from_jinja(CHATML, CHATML_SPECIALS, bos="<|im_start|>", eos="<|im_end|>", where="smollm2")
    assert t.prefix == {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}
    assert t.suffix == {r: "<|im_end|>\n" for r in ("system", "user", "assistant")}
    assert (t.stop, t.begin) == ("<|im_end|>", "")
    assert t.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert t.jinja == CHATML  # exported as the model shipped it


def test_a_begin_token_and_a_header_format_are_read_too():
    t = ChatTemplate.from_jinja(LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                                bos="<|begin_of_text|>", eos="<|eot_id|>", where="llama3")
    assert (t.begin, t.stop, t.default_system) == ("<|begin_of_text|>", "<|eot_id|>", None)
    assert t.prefix["user"] == "<|start_header_id|>user<|end_header_id|>\n\n" and t.suffix["assistant"] == "<|eot_id|>"


def test_a_template_that_changes_the_content_is_refused():
    with pytest.raises(GptstackError, match="weird: the chat template renders something gptstack"):
        ChatTemplate.from_jinja(CHATML.replace("message['content']", "message['content'] | upper"), CHATML_SPECIALS,
                                bos=None, eos="<|im_end|>", where="weird")


@pytest.mark.parametrize("template", [BUILTIN, ChatTemplate(prefix={"system": "S: ", "user": "U: ", "assistant": "A: "},
                                                            suffix={"system": "\n", "user": "\n", "assistant": "<|e|>"},
                                                            stop="<|e|>", eos="<|e|>", begin="<s>", default_system="Hi {x}", trim=True)])
def test_the_jinja_written_from_the_data_renders_what_the_data_renders(template):
    render = jinja_renderer(template.jinja, None, template.eos, "t")
    for conversation in PROBES + [CONV]:
        for gen in (False, True):
            assert render(conversation, gen) == template.render(conversation, gen)


@pytest.fixture(scope="module")
def chatml_tok():
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["What is 2 plus 3? It is 5. Say literally system user assistant\n"] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=CHATML_SPECIALS,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(hf, ChatTemplate.from_jinja(CHATML, CHATML_SPECIALS, bos="<|im_start|>", eos="<|im_end|>", where="t"))


def test_an_imported_template_renders_ids_of_the_jinja_text_and_learns_content_and_stop_only(chatml_tok):
    tok = chatml_tok
    ids, learn = tok.render_chat(CONV)
    assert tok.decode(ids) == jinja_renderer(CHATML, None, "<|im_end|>", "t")(CONV, False)
    end = tok.special["<|im_end|>"]
    learned = [i for i, keep in zip(ids, learn) if keep]
    assert learned == tok.encode("It is 5.") + [end] + tok.encode("<|im_end|>") + [end]  # never the "\n" after <|im_end|>
    assert tok.end == tok.eot == end and ids.count(end) == 5  # the default system turn and four turns; the literal stayed text
    open_ids, open_learn = tok.render_chat(CONV[:1], for_generation=True)
    assert tok.decode(open_ids).endswith("<|im_start|>assistant\n") and not any(open_learn)


def test_an_imported_template_travels_beside_its_tokenizer(chatml_tok, tmp_path):
    chatml_tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.template == chatml_tok.template and again.fingerprint() == chatml_tok.fingerprint()
    assert again.render_chat(CONV) == chatml_tok.render_chat(CONV)
