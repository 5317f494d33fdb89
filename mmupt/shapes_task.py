"""The project's own labelled synthetic visual task: coloured shapes.

Each item is a small image of circles, squares and triangles in four colours, and a question of one
of these types (`write_dataset(questions=...)` picks which; the default is `color`):

- `color`: one shape; "What color is the shape?" (answer: red, green, blue or purple);
- `count`: 1..max_shapes shapes; how many in all;
- `count_color` / `count_kind`: how many of one colour / of one kind.

Written in the MM-UPT data format (JSONL: `id`, `problem` with an `<image>` placeholder, `images`,
`answer`) with train and held-out splits. Training never reads `answer`; it is for monitoring and
evaluation only. The colour task is the one the learning experiment uses: a weak base model
(`mmupt make-base`) is uncertain on it but right more often than not, which is the regime where
majority voting finds the right pseudo-label.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "purple": (140, 50, 170)}
KINDS = ("circle", "square", "triangle")
QUESTION_TYPES = ("color", "count", "count_color", "count_kind")
DEFAULT_QUESTIONS = ("color",)
QUESTION_COLOR = "What color is the shape?"
QUESTION_ALL = "How many shapes are in the image?"
QUESTION_COUNT_COLOR = "How many {color} shapes are in the image?"
QUESTION_KIND = "How many {kind}s are in the image?"
# Other wordings of the colour question: the base model learns to answer them, and to write them when
# asked for a new question about an image (direct synthesis; a seed's own wording is a duplicate).
COLOR_PARAPHRASES = ("Which color does the object in this picture have?", "What is the colour of the figure shown?",
                     "Name the colour of the object drawn here.", "Tell me which colour the drawn figure has.")
MAX_SHAPES = 5


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]


def _overlaps(a, b, gap=3) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place(rng: random.Random, n: int, size: int, sides: tuple[int, int] | None = None) -> list[tuple[int, int, int, int]]:
    low, high = sides or (size // 8, size // 5)
    boxes: list[tuple[int, int, int, int]] = []
    while len(boxes) < n:
        for _ in range(200):
            side = rng.randint(low, high)
            x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
            box = (x, y, x + side, y + side)
            if not any(_overlaps(box, other) for other in boxes):
                boxes.append(box)
                break
        else:  # crowded: start again
            boxes = []
    return boxes


def draw(shapes: list[Shape], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    for shape in shapes:
        fill = COLORS[shape.color]
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            pen.ellipse(shape.box, fill=fill)
        elif shape.kind == "square":
            pen.rectangle(shape.box, fill=fill)
        else:
            pen.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def _shapes(rng: random.Random, n: int, size: int, sides: tuple[int, int] | None = None) -> list[Shape]:
    return [Shape(rng.choice(KINDS), rng.choice(list(COLORS)), box) for box in _place(rng, n, size, sides)]


def make_item(rng: random.Random, question_type: str, size: int = 112,
              max_shapes: int = MAX_SHAPES) -> tuple[Image.Image, str, str]:
    """One image, its question and the answer, for a question type of QUESTION_TYPES."""
    if question_type == "color":
        shapes = _shapes(rng, 1, size, sides=(size // 3, size // 2))  # one shape, large enough to see
        return draw(shapes, size), QUESTION_COLOR, shapes[0].color
    shapes = _shapes(rng, rng.randint(1, max_shapes), size)
    if question_type == "count":
        question, answer = QUESTION_ALL, len(shapes)
    elif question_type == "count_color":
        color = rng.choice([s.color for s in shapes])
        question, answer = QUESTION_COUNT_COLOR.format(color=color), sum(s.color == color for s in shapes)
    elif question_type == "count_kind":
        kind = rng.choice([s.kind for s in shapes])
        question, answer = QUESTION_KIND.format(kind=kind), sum(s.kind == kind for s in shapes)
    else:
        raise ValueError(f"unknown question type {question_type!r}; choose from {QUESTION_TYPES}")
    return draw(shapes, size), question, str(answer)


def answer_space(question_type: str, max_shapes: int = MAX_SHAPES) -> list[str]:
    """Every answer a question of this type can have."""
    if question_type == "color":
        return list(COLORS)
    return [str(n) for n in range(0 if question_type != "count" else 1, max_shapes + 1)]


def response(question_type: str, answer: str) -> str:
    """A short worked answer in the paper's format (what the base model is taught to write)."""
    if question_type == "color":
        return f"The shape is {answer}. The answer is \\boxed{{{answer}}}."
    return f"I count {answer}. The answer is \\boxed{{{answer}}}."


def write_split(out_dir: Path, split: str, count: int, seed: int,
                questions: tuple[str, ...] = DEFAULT_QUESTIONS, size: int = 112) -> Path:
    """Write `{split}.jsonl` and its PNGs under out_dir; return the JSONL path."""
    rng = random.Random(f"{seed}:{split}")
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.jsonl"
    with open(path, "w") as f:
        for i in range(count):
            img, question, answer = make_item(rng, rng.choice(questions), size)
            name = f"{split}_{i:05d}.png"
            img.save(image_dir / name)
            row = {"id": f"{split}-{i:05d}", "problem": f"<image>{question}", "images": [f"images/{name}"],
                   "answer": answer}
            f.write(json.dumps(row) + "\n")
    return path


def write_dataset(out_dir: str | Path, train_size: int, eval_size: int, seed: int = 0,
                  questions: tuple[str, ...] | list[str] = DEFAULT_QUESTIONS) -> tuple[Path, Path]:
    unknown = sorted(set(questions) - set(QUESTION_TYPES))
    if unknown or not questions:
        raise ValueError(f"unknown question type(s) {unknown}; choose from {QUESTION_TYPES}")
    out_dir = Path(out_dir)
    questions = tuple(questions)
    return (write_split(out_dir, "train", train_size, seed, questions),
            write_split(out_dir, "test", eval_size, seed, questions))


def corpus() -> list[str]:
    """Text of the task (questions, answers and written questions) for training the tiny tokenizer."""
    lines = [QUESTION_COLOR, QUESTION_ALL, *COLOR_PARAPHRASES]
    lines += [QUESTION_COUNT_COLOR.format(color=c) for c in COLORS]
    lines += [QUESTION_KIND.format(kind=k) for k in KINDS]
    lines += [f"Question: {q}" for q in (QUESTION_COLOR, *COLOR_PARAPHRASES)]
    lines += [response("color", c) for c in COLORS]
    lines += [response("count", str(n)) for n in range(0, 10)]
    return lines
