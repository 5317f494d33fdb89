"""`mmupt make-base`: the weak tiny base model of the learning demo, built reproducibly offline.

MM-UPT improves a model that is uncertain but right more often than not: its majority answer is a
better label than any single sample. A freshly initialised tiny Qwen2.5-VL is at chance, so we make
such a model with labels, in two stages of supervised fine-tuning on the shapes task's colour question
(fresh images drawn from their own seed, never the train or held-out splits):

1. clean: correct answers, until the model knows the task (greedy answers are right);
2. noisy: each answer is replaced by a wrong colour with probability `label_noise`, which flattens
   the model's answer distribution: sampled at temperature 1 it is right about 1 - label_noise of
   the time, while its most likely answer stays the right one.

A share `question_writing` of the examples teaches the model to write a question about an image when
given the direct-synthesis prompt (`mmupt synth --mode direct`), in one of a few wordings, so that the
synthetic-questions pipeline has a model that can write questions.
The recipe (all fields of BaseRecipe) is saved as `mmupt_base.json` in the model folder.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import shapes_task
from .config import ModelSettings, PromptSettings
from .model import build_messages, build_tiny, encode_prompt, forward_inputs, load_processor, render_prompt

log = logging.getLogger(__name__)
BASE_MARKER = "mmupt_base.json"


@dataclass(frozen=True)
class BaseRecipe:
    seed: int = 0
    hidden: int = 96
    vision_hidden: int = 64
    clean_steps: int = 500
    clean_lr: float = 1e-3
    noisy_steps: int = 300
    noisy_lr: float = 5e-4
    label_noise: float = 0.5
    question_writing: float = 0.2
    batch_size: int = 16

    def architecture(self) -> dict:
        return {"seed": self.seed, "hidden": self.hidden, "vision_hidden": self.vision_hidden}


def _example(processor, rng: random.Random, noise: float, question_writing: float) -> tuple[list[int], list[int], dict]:
    """One (prompt + answer) example: token ids, labels (-100 on the prompt) and image inputs."""
    from .synth.prompts import DIRECT  # noqa: PLC0415

    image, question, answer = shapes_task.make_item(rng, "color")
    if rng.random() < question_writing:
        wording = rng.choice((shapes_task.QUESTION_COLOR, *shapes_task.COLOR_PARAPHRASES))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DIRECT}]}]
        target = f"Question: {wording}"
    else:
        question = rng.choice((question, *shapes_task.COLOR_PARAPHRASES))
        if rng.random() < noise:
            answer = rng.choice([c for c in shapes_task.COLORS if c != answer])
        messages = build_messages(f"<image>{question}", 1, PromptSettings())
        target = shapes_task.response("color", answer)
    encoded = encode_prompt(processor, render_prompt(processor, messages), [image])
    prompt_ids = encoded["input_ids"][0].tolist()
    answer_ids = processor.tokenizer(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
    images = {"pixel_values": encoded["pixel_values"], "image_grid_thw": encoded["image_grid_thw"]}
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, images


def _batch(processor, rng: random.Random, size: int, noise: float, question_writing: float) -> dict:
    examples = [_example(processor, rng, noise, question_writing) for _ in range(size)]
    width = max(len(ids) for ids, _, _ in examples)
    pad = processor.tokenizer.pad_token_id
    ids = torch.full((size, width), pad)
    labels = torch.full((size, width), -100)
    mask = torch.zeros((size, width), dtype=torch.long)
    for row, (tokens, targets, _) in enumerate(examples):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(targets)] = torch.tensor(targets)
        mask[row, :len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.cat([e[2]["pixel_values"] for e in examples]),
            "image_grid_thw": torch.cat([e[2]["image_grid_thw"] for e in examples])}


def _train(model, processor, rng: random.Random, steps: int, lr: float, noise: float, recipe: BaseRecipe,
           stage: str) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc=f"make-base ({stage})", unit="step", dynamic_ncols=True):
        batch = _batch(processor, rng, recipe.batch_size, noise, recipe.question_writing)
        logits = model(**forward_inputs(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                        batch["image_grid_thw"])).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 batch["labels"][:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
    return loss_value


def build_base(path: str | Path, recipe: BaseRecipe | None = None) -> Path:
    """Build the tiny model at `path` and fine-tune it into the weak base (about 2-3 minutes on 2 cores)."""
    from transformers import AutoModelForImageTextToText  # noqa: PLC0415

    recipe = recipe or BaseRecipe()
    path = Path(path)
    started = time.monotonic()
    build_tiny(path, **recipe.architecture())
    processor = load_processor(ModelSettings(path=str(path)))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).train()
    torch.manual_seed(recipe.seed)
    rng = random.Random(f"make-base:{recipe.seed}")
    losses = {"clean": _train(model, processor, rng, recipe.clean_steps, recipe.clean_lr, 0.0, recipe, "clean"),
              "noisy": _train(model, processor, rng, recipe.noisy_steps, recipe.noisy_lr, recipe.label_noise,
                              recipe, "noisy")}
    model.eval().save_pretrained(path)
    record = {**asdict(recipe), "final_loss": losses, "seconds": round(time.monotonic() - started, 1)}
    (path / BASE_MARKER).write_text(json.dumps(record, indent=2))
    log.info("built the tiny base model at %s in %.0f s (final losses %s)", path, record["seconds"], losses)
    return path
