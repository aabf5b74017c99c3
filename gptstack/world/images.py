"""The image world: small pictures rendered with Pillow, questions about them with exact answers, and the gold
checker. Deterministic from a seed.

A picture is a 2×2 grid of cells on a black background. Up to three cells hold a shape (square, circle, triangle),
each of its own colour (red, green, blue, yellow, purple) and its own kind, drawn at a random size with a little
jitter; a free cell may hold a white digit. Questions, one word answers:

    colour     What colour is the circle?                      red | green | blue | yellow | purple
    shape      What shape is the blue object?                  square | circle | triangle
    count      How many shapes are there?                      1 | 2 | 3
    position   Is the red square on the left or the right?     left | right
    relation   What colour is the shape left of the triangle?  a colour
    digit      What digit is in the picture?                   0 ... 9

Every type needs the picture: each question is built answer first, the answer drawn uniformly from its type's
answers, then a picture that gives that answer, so the question's words alone say nothing about it (chance is
1 / the number of answers). Compositional splits (CLEVR-CoGenT style): three colour-shape pairs (red circle, green
triangle, blue square) never appear in a train picture, and every dev and test picture holds at least one of
them. Dev and test are disjoint draws (different seeds) of the same kind: dev chooses, test reports.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (60, 100, 240), "yellow": (230, 210, 40),
           "purple": (170, 70, 220)}
SHAPES = ("square", "circle", "triangle")
HELD_OUT = {("red", "circle"), ("green", "triangle"), ("blue", "square")}  # never together in a train picture
SPLITS = ("train", "dev", "test")
CELLS = ("top left", "top right", "bottom left", "bottom right")  # cell i: row i // 2, column i % 2
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine".split())}

ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": ("1", "2", "3"), "position": ("left", "right"),
           "relation": tuple(COLOURS), "digit": tuple(str(d) for d in range(10))}
TYPES = tuple(ANSWERS)
CHANCE = {t: 1 / len(a) for t, a in ANSWERS.items()}  # answers are uniform within a type, whatever the words say
CAPTION_PROMPT = "Describe the picture."
SUPERSAMPLE = 4  # drawn this many times larger, then scaled down: smooth edges at any size


@dataclass(frozen=True)
class Thing:
    cell: int  # 0..3, see CELLS
    colour: str  # a colour, or "white" for a digit
    kind: str  # a shape, or a digit "0".."9"
    size: float  # share of the cell's side
    dx: float = 0.0  # jitter, as a share of the cell's side
    dy: float = 0.0

    @property
    def is_shape(self) -> bool:
        return self.kind in SHAPES


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]

    @property
    def shapes(self) -> list[Thing]:
        return [t for t in self.things if t.is_shape]

    def holds_held_out(self) -> bool:
        return any(held_out(t.cell, t.colour, t.kind) for t in self.shapes)

    def caption(self) -> str:
        """The picture in words, cell by cell: stage 1's target."""
        parts = []
        for t in sorted(self.things, key=lambda t: t.cell):
            parts.append(f"the digit {t.kind} {CELLS[t.cell]}" if not t.is_shape else f"a {t.colour} {t.kind} {CELLS[t.cell]}")
        return ", ".join(parts) + "."


@dataclass(frozen=True)
class ImageQuestion:
    type: str
    question: str
    answer: str
    scene: Scene
    split: str
    id: str = field(default="")


def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as an RGB picture of size × size pixels."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    cell = big / 2
    for t in scene.things:
        cx = (t.cell % 2 + 0.5 + t.dx) * cell
        cy = (t.cell // 2 + 0.5 + t.dy) * cell
        r = t.size * cell / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        if t.kind == "square":
            draw.rectangle(box, fill=COLOURS[t.colour])
        elif t.kind == "circle":
            draw.ellipse(box, fill=COLOURS[t.colour])
        elif t.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLOURS[t.colour])
        else:
            font = ImageFont.load_default(size=round(2.2 * r))
            draw.text((cx, cy), t.kind, fill=(255, 255, 255), font=font, anchor="mm")
    return img.resize((size, size), Image.Resampling.BOX)


class ImageWorld:
    """Questions and captions of a split, each a pure function of (seed, split, index)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def questions(self, split: str, n: int, types: tuple[str, ...] = TYPES) -> list[ImageQuestion]:
        """n questions, the types in turn, each answer uniform within its type."""
        _check_split(split)
        out = []
        for i in range(n):
            rng = random.Random(f"vision:{self.seed}:{split}:question:{i}")
            kind = types[i % len(types)]
            answer = rng.choice(ANSWERS[kind])
            scene, text = _question(kind, answer, split, rng)
            out.append(ImageQuestion(kind, text, answer, scene, split, f"{split}-{i}"))
        return out

    def captions(self, split: str, n: int) -> list[Scene]:
        """n pictures of the split (their captions: `Scene.caption`)."""
        _check_split(split)
        out = []
        for i in range(n):
            rng = random.Random(f"vision:{self.seed}:{split}:caption:{i}")
            while True:
                scene = _scene(rng, rng.randint(1, 3), digit=rng.random() < 0.5)
                if _fits(scene, split):
                    out.append(scene)
                    break
        return out


def check(answer: str, question: ImageQuestion) -> bool:
    """The gold checker: the answer's first word, lower case, without punctuation (a number may be a word)."""
    words = answer.strip().lower().replace(".", " ").replace(",", " ").replace("!", " ").split()
    if not words:
        return False
    word = words[0]
    return NUMBER_WORDS.get(word, word) == question.answer


# ---------------------------------------------------------------- building a question answer first

def held_out(cell: int, colour: str, kind: str) -> bool:
    """Whether a shape is one of the combinations no train picture holds."""
    return (colour, kind) in HELD_OUT


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def _fits(scene: Scene, split: str) -> bool:
    """Train pictures hold no held-out pair; dev and test pictures hold at least one."""
    return scene.holds_held_out() == (split != "train")


def _thing(rng: random.Random, cell: int, colour: str, kind: str) -> Thing:
    size = rng.uniform(0.55, 0.8) if kind in SHAPES else rng.uniform(0.7, 0.8)
    room = (1 - size) / 2
    return Thing(cell, colour, kind, size, rng.uniform(-room, room), rng.uniform(-room, room))


def _scene(rng: random.Random, n: int, digit: bool | str, fixed: tuple[tuple[int, str, str], ...] = (),
           avoid=lambda colour, kind: False) -> Scene:
    """n shapes in distinct cells, `fixed` ones first ((cell, colour, kind)), the others drawn at random but never
    `avoid`ed (so what a question names stays unique), and a digit in a free cell: `digit` names it, or True draws
    one (if a cell is free)."""
    free = [c for c in range(4) if c not in {c for c, _, _ in fixed}]
    rng.shuffle(free)
    things = [_thing(rng, c, col, k) for c, col, k in fixed]
    while len(things) < n:
        colour, kind = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
        if not avoid(colour, kind):
            things.append(_thing(rng, free.pop(), colour, kind))
    if digit and free:
        things.append(_thing(rng, free.pop(), "white", digit if isinstance(digit, str) else str(rng.randrange(10))))
    return Scene(tuple(sorted(things, key=lambda t: t.cell)))


def _question(kind: str, answer: str, split: str, rng: random.Random) -> tuple[Scene, str]:
    """A picture whose answer to a `kind` question is `answer` and which fits the split, and the question. The
    question and what it pins down (its head) are drawn first and the rest of the picture is redrawn until it
    fits. Every head fits a dev or test picture, so there the question's words stay independent of the answer
    and a model without the picture can do no better than chance; a train head holding a held-out pair fits no
    picture and is drawn again."""
    for _ in range(1000):
        text, n, digit, fixed, avoid = _head(kind, answer, rng)
        held = any(held_out(*thing) for thing in fixed)
        if split == "train" and held:
            continue
        if split != "train" and fixed and not held:  # room for a held-out pair beside what the question pins down
            n = max(n, len(fixed) + 1)
        for _ in range(200):
            scene = _scene(rng, n, digit, fixed, avoid)
            if _fits(scene, split):
                return scene, text
    raise RuntimeError(f"no {split} picture answers a {kind} question with {answer!r}")  # unreachable by design


def _head(kind: str, answer: str, rng: random.Random):
    """A `kind` question whose answer is `answer`: its text, how many shapes, the digit, the things it pins down
    and what no other shape may be (so that what it names is unique)."""
    cell = rng.randrange(4)
    n = rng.randint(1, 3)
    digit = rng.random() < 0.5
    if kind == "colour":
        shape = rng.choice(SHAPES)
        return (f"What colour is the {shape}?", n, digit, ((cell, answer, shape),),
                lambda c, k: k == shape)
    if kind == "shape":
        colour = rng.choice(tuple(COLOURS))
        return (f"What shape is the {colour} object?", n, digit, ((cell, colour, answer),),
                lambda c, k: c == colour)
    if kind == "count":
        return "How many shapes are there?", int(answer), digit, (), lambda c, k: False
    if kind == "position":
        colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
        cell = 2 * rng.randrange(2) + (answer == "right")
        return (f"Is the {colour} {shape} on the left or the right?", n, digit, ((cell, colour, shape),),
                lambda c, k: (c, k) == (colour, shape))
    if kind == "relation":  # two shapes side by side in one row; the question names one, asks the other's colour
        row, side = rng.randrange(2), rng.choice(("left", "right"))
        named, other = rng.choice(SHAPES), rng.choice(SHAPES)
        named_colour = rng.choice(tuple(COLOURS))
        named_cell, other_cell = (2 * row + 1, 2 * row) if side == "left" else (2 * row, 2 * row + 1)
        return (f"What colour is the shape {side} of the {named}?", max(n, 2), digit,
                ((named_cell, named_colour, named), (other_cell, answer, other)), lambda c, k: k == named)
    if kind == "digit":
        return "What digit is in the picture?", n, answer, (), lambda c, k: False
    raise ValueError(f"unknown question type {kind!r}")
