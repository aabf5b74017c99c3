"""Image input: the image world and its gold checker, the splice (exact, in reading order, with one-line errors on a
mismatch), stage 1 training the projector alone, images following their sequence through the engine, a tiny
model that learns colours from pictures, the vision stage through the pipeline, and a PNG data URL answered
through the server with the openai client."""
import base64
import io
import re
from collections import Counter

import pytest
import torch

from conftest import run_cli, serving
from gptstack.checkpoint import load_model
from gptstack.data.loader import Demonstrations
from gptstack.errors import GptstackError
from gptstack.evals.vision import evaluate_vision, question_messages
from gptstack.generate import Engine, Sequence, generate
from gptstack.model import GPT, ModelConfig, VisionConfig
from gptstack.stages.vision import caption_conversations, trainable, with_image_input
from gptstack.tokenizer import BUILTIN, IMAGE, SPECIAL_TOKENS, Tokenizer
from gptstack.train.sft import SFTObjective
from gptstack.train.trainer import TrainConfig, Trainer
from gptstack.world.images import CHANCE, HELD_OUT, TYPES, ImageWorld, check, render

SIZE = 32  # pictures of 32×32 pixels: 4×4 patches of 8, pixel-shuffled 2×2 -> 4 image tokens, one per cell


@pytest.fixture(scope="module")
def tok():
    world = ImageWorld(0)
    text = [q.question + " " + q.answer for q in world.questions("train", 300)] + [s.caption() for s in world.captions("train", 100)]
    return Tokenizer.train(text * 3, vocab_size=400)


def vision_model(tok, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    vision = VisionConfig(image_size=SIZE, patch_size=8, width=32, layers=1, heads=2, shuffle=2, image_token=tok.image_id)
    return GPT(ModelConfig(n_layer=2, n_embd=64, n_head=2, n_ctx=64, vocab_size=tok.vocab_size, vision=vision, **kw))


def pictures(n, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the world

def test_the_world_is_deterministic_and_its_splits_keep_the_held_out_pairs_apart():
    a, b = ImageWorld(3).questions("test", 60), ImageWorld(3).questions("test", 60)
    assert a == b and render(a[0].scene).tobytes() == render(b[0].scene).tobytes()
    for split, held in (("train", False), ("dev", True), ("test", True)):
        for q in ImageWorld(0).questions(split, 300):
            assert q.scene.holds_held_out() == held
            assert not held or any((t.colour, t.kind) in HELD_OUT for t in q.scene.shapes)
    assert {q.type for q in a} == set(TYPES)
    assert {s.caption() for s in ImageWorld(0).captions("dev", 20)} != {s.caption() for s in ImageWorld(0).captions("test", 20)}


def test_test_answers_are_uniform_given_the_words_so_blind_guessing_is_chance():
    qs = [q for q in ImageWorld(0).questions("test", 3000) if q.type == "colour"]
    for text in {q.question for q in qs}:
        counts = Counter(q.answer for q in qs if q.question == text)
        assert len(counts) == 5 and max(counts.values()) < 2 * min(counts.values())  # every colour, none twice as often


def test_every_answer_is_right_for_its_picture():
    for q in ImageWorld(1).questions("test", 120):
        shapes = q.scene.shapes
        if q.type == "count":
            assert len(shapes) == int(q.answer)
        if q.type == "colour":
            (t,) = [t for t in shapes if t.kind == q.question.split()[-1][:-1]]
            assert t.colour == q.answer
        if q.type == "digit":
            assert [t.kind for t in q.scene.things if not t.is_shape] == [q.answer]


def test_the_gold_checker():
    q = ImageWorld(0).questions("train", 3)[2]  # count
    assert check(q.answer, q) and check(f" {q.answer.upper()}.", q)
    assert check({"1": "One", "2": "two!", "3": "three"}[q.answer], q)
    assert not check("", q) and not check("many", q)
    assert CHANCE["digit"] == 0.1 and CHANCE["position"] == 0.5


# ---------------------------------------------------------------- the splice

def test_the_spliced_rows_are_the_projectors_output_exactly(tok):
    model = vision_model(tok)
    k = model.cfg.vision.tokens
    text = tok.encode(" What colour")
    first = [*text, *[tok.image_id] * k, *text, *[tok.image_id] * k]
    idx = torch.tensor([first, ([tok.image_id] * k + text * len(first))[:len(first)]])  # two images, then one
    images = pictures(3)
    x = model.input_embeddings(idx, images)
    vectors = model.vision.project(model.vision.features(images))  # encoder, pixel shuffle, projector
    where = idx == tok.image_id
    assert torch.equal(x[where], vectors.reshape(-1, model.cfg.n_embd))  # bit for bit, in reading order
    assert torch.equal(x[~where], model.wte(idx)[~where])
    assert torch.equal(x[0, len(text):len(text) + k], vectors[0]) and torch.equal(x[1, :k], vectors[2])


def test_pixel_shuffle_puts_each_2x2_block_of_patches_into_one_token(tok):
    model = vision_model(tok)
    g, C = model.cfg.vision.grid, model.cfg.vision.width
    features = torch.arange(g * g, dtype=torch.float)[None, :, None].expand(1, g * g, C).contiguous()
    with torch.no_grad():
        model.vision.projector.weight.zero_()
        model.vision.projector.bias.zero_()
        model.vision.projector.weight[:4, ::C] = torch.eye(4)  # output i reads the i-th patch of the block
    out = model.vision.project(features)[0, :, :4]
    assert out.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


@pytest.mark.parametrize("placeholders,images", [(4, 2), (8, 1), (3, 1), (4, 0)])
def test_placeholders_and_images_that_do_not_match_are_a_one_line_error(tok, placeholders, images):
    model = vision_model(tok)
    idx = torch.tensor([tok.encode(" hi") + [tok.image_id] * placeholders])
    with pytest.raises(GptstackError) as e:
        model(idx, images=pictures(images) if images else None)
    assert "placeholders" in str(e.value) and "\n" not in str(e.value)


def test_images_need_a_model_with_an_encoder_and_the_right_shape(tok):
    plain = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=32, vocab_size=tok.vocab_size))
    with pytest.raises(GptstackError, match="takes no images"):
        plain(torch.tensor([[1, 2]]), images=pictures(1))
    with pytest.raises(GptstackError, match="model takes no images"):
        tok.render_chat([{"role": "user", "content": [{"type": "image", "image": pictures(1)[0]}]}])
    with pytest.raises(GptstackError, match=r"images must be \(N, 3, 32, 32\)"):
        vision_model(tok)(torch.tensor([[tok.image_id] * 4]), images=torch.zeros(1, 3, 8, 8))


def test_a_tokenizer_without_the_image_token_gains_it_and_the_table_grows():
    from tokenizers import Tokenizer as HF
    trained = Tokenizer.train(["a red square, a blue circle"] * 20, vocab_size=300)
    bare = Tokenizer(HF.from_str(trained.hf.to_str().replace(IMAGE, "<|unused|>")), BUILTIN)  # as an imported model's
    assert IMAGE not in bare.special and all(t in bare.special for t in SPECIAL_TOKENS if t != IMAGE)
    model = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=32, vocab_size=bare.vocab_size))
    old = model.wte.weight.detach().clone()
    seeing = with_image_input(model, bare, VisionConfig(image_size=SIZE, width=32, heads=2))
    assert seeing.vocab_size == bare.vocab_size + 1 == model.cfg.vocab_size
    assert model.cfg.vision.image_token == seeing.image_id == bare.vocab_size
    assert torch.equal(model.wte.weight[:-1], old) and torch.allclose(model.wte.weight[-1], old.mean(0))


# ---------------------------------------------------------------- stage 1: the projector alone

def test_stage_one_trains_the_projector_alone(tok, tmp_path):
    model = vision_model(tok)
    captions = caption_conversations(ImageWorld(0).captions("train", 16), SIZE)
    data = Demonstrations(captions, tok, model.cfg.n_ctx, model.cfg.vision.tokens)
    trainable(model, {"projector"})
    objective = SFTObjective(data, data, 0, 1.0)
    loss, _ = objective.loss(model, objective.train_batch(0, 8))
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("vision.projector."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=3, device="cpu")
    Trainer(cfg, model, objective, tmp_path, metadata=model.metadata()).fit()
    after = load_model(tmp_path).state_dict()
    for name, value in after.items():
        if name.startswith("vision.projector."):
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name  # bitwise unchanged


# ---------------------------------------------------------------- the engine

def test_images_follow_their_sequence_through_the_engine(tok):
    model = vision_model(tok).eval()
    k = model.cfg.vision.tokens
    prompts = [[*tok.encode(" What"), *[tok.image_id] * k, *tok.encode(" colour?")],
               [*[tok.image_id] * k, *tok.encode(" shape")],
               [*tok.encode(" How many"), *[tok.image_id] * (2 * k)]]
    images = [pictures(1, 1), pictures(1, 2), pictures(2, 3)]
    alone = [generate(model, [p], 6, temperature=0, images=[im])[0] for p, im in zip(prompts, images)]
    together = generate(model, prompts, 6, temperature=0, images=images)
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert torch.allclose(torch.tensor([g.logprobs for g in together]), torch.tensor([g.logprobs for g in alone]), atol=1e-5)
    other = generate(model, [prompts[0]], 6, temperature=0, images=[pictures(1, 9)])[0]
    assert other.logprobs[0] != pytest.approx(alone[0].logprobs[0], abs=1e-5)  # the answer depends on the picture
    alone = [g.tokens for g in alone]
    # continuous batching: a sequence with its picture joins a batch that is already decoding
    engine = Engine(model, 4)
    first, late = (Sequence(p, 6, temperature=0, images=im) for p, im in zip(prompts[:2], images[:2]))
    engine.admit([first])
    engine.step()
    engine.admit([late])
    while engine.busy:
        engine.step()
    assert [first.out.tokens, late.out.tokens] == alone[:2]


# ---------------------------------------------------------------- a tiny model that must learn

@pytest.fixture(scope="module")
def seeing(tok, tmp_path_factory):
    """A tiny vision model (decoder and encoder from scratch) trained on colour questions for a few seconds."""
    folder = tmp_path_factory.mktemp("seeing")
    model = vision_model(tok, seed=1)
    world = ImageWorld(0)
    convs = [question_messages(q, SIZE, answer=q.answer) for q in world.questions("train", 2000, types=("colour",))]
    data = Demonstrations(convs, tok, model.cfg.n_ctx, model.cfg.vision.tokens)
    cfg = TrainConfig(steps=250, batch_size=32, lr=3e-3, warmup_steps=10, weight_decay=0.0, log_every=50, ckpt_every=250,
                      device="cpu")
    Trainer(cfg, model, SFTObjective(data, data, 0, 1.0), folder, metadata=model.metadata()).fit()
    tok.save(folder / "tokenizer.json")
    return folder


def test_a_tiny_model_learns_colours_from_pictures_and_not_from_words(tok, seeing):
    model = load_model(seeing)
    unseen = ImageWorld(3).questions("train", 100, types=("colour",))  # pictures it never trained on
    seen, _ = evaluate_vision(model, tok, unseen)
    blind, _ = evaluate_vision(model, tok, unseen, with_image=False)
    assert seen["accuracy"] >= CHANCE["colour"] + 0.5, seen
    assert blind["accuracy"] <= CHANCE["colour"] + 0.15, blind


# ---------------------------------------------------------------- the server

openai = pytest.importorskip("openai")


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_png_data_urls_through_the_server_get_the_engines_right_answers_on_held_out_pictures(tok, seeing):
    from gptstack.serve.app import create_app
    model = load_model(seeing)
    questions = ImageWorld(3).questions("train", 5, types=("colour",))  # pictures the model never trained on
    _, engine = evaluate_vision(model, tok, questions)
    with serving(create_app(model, tok, "seeing")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        answers = []
        for q in questions:
            content = [{"type": "image_url", "image_url": {"url": png_data_url(render(q.scene, SIZE))}},
                       {"type": "text", "text": q.question}]
            r = client.chat.completions.create(model="seeing", messages=[{"role": "user", "content": content}],
                                               max_tokens=4, temperature=0)
            answers.append(r.choices[0].message.content)
        assert answers == [s["answer"] for s in engine]  # the picture reached the model whole, through the one engine
        assert sum(check(a, q) for a, q in zip(answers, questions)) >= 4, (answers, [q.answer for q in questions])
        for url_, code in (("https://example.com/a.png", "invalid_image_url"),
                           ("data:image/png;base64,bm90IGEgcGljdHVyZQ==", "invalid_image")):
            bad = [{"type": "image_url", "image_url": {"url": url_}}, {"type": "text", "text": questions[0].question}]
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="seeing", messages=[{"role": "user", "content": bad}], max_tokens=2)
            assert e.value.body["code"] == code and e.value.body["param"] == "messages.0.content.0.image_url"


def test_a_model_without_image_input_refuses_pictures_with_a_400(random_model_dir):
    from gptstack.checkpoint import find_tokenizer
    from gptstack.serve.app import create_app
    model, tok = load_model(random_model_dir), Tokenizer.load(find_tokenizer(random_model_dir))
    with serving(create_app(model, tok, "plain")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        content = [{"type": "image_url", "image_url": {"url": png_data_url(render(ImageWorld(0).captions("test", 1)[0]))}}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="plain", messages=[{"role": "user", "content": content}], max_tokens=2)
        assert e.value.body["code"] == "image_not_supported"


# ---------------------------------------------------------------- the verbs

def test_sample_with_an_image_and_its_errors(seeing, tmp_path):
    q = ImageWorld(3).questions("train", 1, types=("colour",))[0]  # a picture the model never trained on
    render(q.scene, SIZE).save(tmp_path / "q.png")
    r = run_cli("sample", "--model", seeing, "--chat", "--image", tmp_path / "q.png", "--prompt", q.question,
                "--temperature", "0", "--max-new-tokens", "4")
    assert r.returncode == 0 and check(r.stdout, q), (r.stdout, r.stderr, q.answer)
    (tmp_path / "bad.png").write_text("not a picture")
    r = run_cli("sample", "--model", seeing, "--image", tmp_path / "bad.png")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.png: not a picture" in r.stderr


def test_chat_shows_a_picture_with_the_next_message(tok, seeing, random_model_dir, tmp_path):
    from gptstack.chat import chat
    model = load_model(seeing)
    q = ImageWorld(3).questions("train", 1, types=("colour",))[0]
    render(q.scene, SIZE).save(tmp_path / "q.png")
    (tmp_path / "bad.png").write_bytes(b"no picture")
    lines = iter([f"/image {tmp_path / 'bad.png'}", f"/image {tmp_path / 'q.png'}", q.question])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    out = io.StringIO()
    chat(model, tok, max_new_tokens=4, temperature=0, read=read, out=out)
    _, engine = evaluate_vision(model, tok, [q])
    text = out.getvalue()
    assert "bad.png: not a picture" in text and "q.png will go with your next message" in text
    assert f"assistant> {engine[0]['answer']}\n" in text
    plain, out = load_model(random_model_dir), io.StringIO()
    lines = iter([f"/image {tmp_path / 'q.png'}"])
    chat(plain, Tokenizer.load(random_model_dir / "tokenizer.json"), read=read, out=out)
    assert "(this model takes no images)" in out.getvalue()


def test_the_vision_stage_through_the_pipeline(tok, tmp_path):
    import json

    from gptstack.checkpoint import save_state_dict
    run, chat_model = tmp_path / "run", tmp_path / "sft"
    chat_model.mkdir()
    text_only = GPT(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_ctx=96, vocab_size=tok.vocab_size))
    save_state_dict(text_only.state_dict(), chat_model / "model.safetensors", text_only.metadata())
    run.mkdir()
    tok.save(run / "tokenizer.json")
    tiny = ["vision.encoder.width=32", "vision.encoder.heads=2", "vision.encoder.layers=1", "vision.captions=40",
            "vision.questions=60", "vision.described=20", "vision.dev_questions=12", "vision.test_questions=12",
            "vision.align.steps=2", "vision.train.steps=2", "vision.train.batch_size=8", "vision.align.batch_size=8",
            "vision.samples=6"]
    r = run_cli("pipeline", "--out", run, "--stages", "vision", f"vision.init={chat_model}", *tiny)
    assert r.returncode == 0, r.stderr[-2000:]
    v = json.loads((run / "report.json").read_text())["vision"]
    assert set(v["by_type"]) == set(TYPES)
    for row in v["by_type"].values():
        assert set(row) >= {"accuracy", "no_image_accuracy", "chance", "n"} and row["n"] == 2
    assert {"accuracy", "no_image_accuracy", "chance", "seconds"} <= set(v) and v["split"] == "test"
    assert "## Image input" in (run / "report.md").read_text()
    assert (run / "plots" / "vision.png").is_file() and (run / "plots" / "vision_samples.png").is_file()
    assert load_model(run / "vision").cfg.vision.tokens == 4 and "vision: test accuracy" in r.stdout


@pytest.mark.parametrize("override,message", [
    ("vision.blind_share=1", "vision.blind_share' must be in [0, 1)"),
    ("vision.encoder.image_size=30", "vision.encoder.image_size' (30) must be a multiple of patch_size × shuffle (4 × 4)"),
    ("vision.train.lora_rank=8", "vision.train.lora_rank' must be 0"),
])
def test_bad_vision_settings_are_one_line_errors(override, message):
    from gptstack.stages import RunConfig
    with pytest.raises(GptstackError, match=re.escape(message)):
        RunConfig.resolve("tiny", overrides=[override])
