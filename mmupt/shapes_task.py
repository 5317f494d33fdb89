"""The project's own labelled synthetic visual task: count coloured shapes.

Each item is a small image with 1..max_shapes non-overlapping circles, squares and triangles in a few
colours, and a question: how many shapes in all, or how many of one colour or one kind. Written in
the MM-UPT data format (JSONL: `id`, `problem` with an `<image>` placeholder, `images`, `answer`) with
train and held-out splits. Training never reads `answer`; it is for monitoring and evaluation only.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
KINDS = ("circle", "square", "triangle")
QUESTION_ALL = "How many shapes are in the image?"
QUESTION_COLOR = "How many {color} shapes are in the image?"
QUESTION_KIND = "How many {kind}s are in the image?"


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]


def _overlaps(a, b, gap=3) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place(rng: random.Random, n: int, size: int) -> list[tuple[int, int, int, int]]:
    boxes: list[tuple[int, int, int, int]] = []
    while len(boxes) < n:
        for _ in range(200):
            side = rng.randint(size // 8, size // 5)
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


def make_item(rng: random.Random, max_shapes: int, size: int) -> tuple[Image.Image, str, str]:
    n = rng.randint(1, max_shapes)
    shapes = [Shape(rng.choice(KINDS), rng.choice(list(COLORS)), box) for box in _place(rng, n, size)]
    kind_of_question = rng.random()
    if kind_of_question < 0.5:
        question, answer = QUESTION_ALL, n
    elif kind_of_question < 0.75:
        color = rng.choice([s.color for s in shapes])
        question, answer = QUESTION_COLOR.format(color=color), sum(s.color == color for s in shapes)
    else:
        kind = rng.choice([s.kind for s in shapes])
        question, answer = QUESTION_KIND.format(kind=kind), sum(s.kind == kind for s in shapes)
    return draw(shapes, size), question, str(answer)


def write_split(out_dir: Path, split: str, count: int, seed: int, max_shapes: int = 5, size: int = 112) -> Path:
    """Write `{split}.jsonl` and its PNGs under out_dir; return the JSONL path."""
    rng = random.Random(f"{seed}:{split}")
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.jsonl"
    with open(path, "w") as f:
        for i in range(count):
            img, question, answer = make_item(rng, max_shapes, size)
            name = f"{split}_{i:05d}.png"
            img.save(image_dir / name)
            row = {"id": f"{split}-{i:05d}", "problem": f"<image>{question}", "images": [f"images/{name}"],
                   "answer": answer}
            f.write(json.dumps(row) + "\n")
    return path


def write_dataset(out_dir: str | Path, train_size: int, eval_size: int, seed: int = 0) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return write_split(out_dir, "train", train_size, seed), write_split(out_dir, "test", eval_size, seed)


def corpus() -> list[str]:
    """Text of the task (questions, reasoning and answers) for training the tiny tokenizer."""
    lines = [QUESTION_ALL]
    lines += [QUESTION_COLOR.format(color=c) for c in COLORS]
    lines += [QUESTION_KIND.format(kind=k) for k in KINDS]
    for n in range(0, 10):
        lines.append(f"I count the shapes in the image. There are {n} shapes. The answer is \\boxed{{{n}}}.")
        for c in COLORS:
            lines.append(f"There are {n} {c} shapes, so the answer is \\boxed{{{n}}}.")
        for k in KINDS:
            lines.append(f"I see {n} {k}s. The final answer is \\boxed{{{n}}}.")
    return lines
