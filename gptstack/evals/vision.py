"""Image questions of the built-in image world answered greedily by the one engine and checked by the world's
gold checker, by question type; the same model asked the same questions without the picture shows how much of
each answer comes from the image."""
from __future__ import annotations

from collections import defaultdict

from ..generate import respond
from ..images import image_tensor
from ..tokenizer import Tokenizer, chat_messages
from ..world.images import CHANCE, ImageQuestion, check, render


def question_messages(q: ImageQuestion, image_size: int, with_image: bool = True, answer: str | None = None) -> list[dict]:
    """The user's turn (the picture, then the question; or the question alone) and the answer, if given."""
    if not with_image:
        return chat_messages(q.question, answer=answer)
    content = [{"type": "image", "image": image_tensor(render(q.scene, image_size), image_size)},
               {"type": "text", "text": q.question}]
    return [{"role": "user", "content": content}] + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def evaluate_vision(model, tok: Tokenizer, questions: list[ImageQuestion], max_new_tokens: int = 4,
                    with_image: bool = True, batch_size: int = 64) -> tuple[dict, list[dict]]:
    """Accuracy overall and by type (with each type's chance and n); per-question samples."""
    size = model.cfg.vision.image_size
    got = respond(model, tok, [question_messages(q, size, with_image) for q in questions], max_new_tokens,
                  batch_size=batch_size)
    by_type = defaultdict(list)
    samples = []
    for q, (text, _) in zip(questions, got):
        ok = check(text, q)
        by_type[q.type].append(ok)
        samples.append({"id": q.id, "type": q.type, "question": q.question, "answer": text, "gold": q.answer, "correct": ok})
    types = {t: {"accuracy": sum(v) / len(v), "chance": CHANCE[t], "n": len(v)} for t, v in by_type.items()}
    figures = {"accuracy": sum(s["correct"] for s in samples) / max(1, len(samples)), "n": len(samples),
               "chance": sum(CHANCE[q.type] for q in questions) / max(1, len(questions)), "by_type": types}
    return figures, samples
