"""`mmupt make-base`: the weak tiny base model of the learning demo, built reproducibly offline.

MM-UPT improves a model that is uncertain but right more often than not: its majority answer is a
better label than any single sample. A freshly initialised tiny Qwen2.5-VL is at chance, so we make
such a model with labels, in two stages of supervised fine-tuning on the shapes task's colour question
(fresh images drawn from their own seed, never the train or held-out splits):

1. clean: correct answers, until the model knows the task (greedy answers are right);
2. noisy: the answer's colour is taught as a distribution, right with probability 1 - `label_noise`
   and each wrong colour with the rest shared equally (soft targets), which flattens the model's
   answers: sampled at temperature 1 it is right about 1 - label_noise of the time, while its most
   likely answer, and the majority of a group, stay the right one.

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


def colour_token_ids(tokenizer) -> dict[str, int]:
    """The token of each colour as the answer writes it first ("The shape is red.")."""
    ids = {c: tokenizer(f" {c}", add_special_tokens=False)["input_ids"] for c in shapes_task.COLORS}
    if any(len(v) != 1 for v in ids.values()):
        raise ValueError(f"each colour must be one token of the tiny tokenizer, got {ids}")
    return {c: v[0] for c, v in ids.items()}


def _example(processor, rng: random.Random, question_writing: float) -> tuple[list[int], list[int], dict, str | None]:
    """One (prompt + answer) example: token ids, labels (-100 on the prompt), image inputs and the
    answer's colour (None for a question-writing example)."""
    from .synth.prompts import DIRECT  # noqa: PLC0415

    image, question, answer = shapes_task.make_item(rng, "color")
    if rng.random() < question_writing:
        wording = rng.choice((shapes_task.QUESTION_COLOR, *shapes_task.COLOR_PARAPHRASES))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DIRECT}]}]
        target, colour = f"Question: {wording}", None
    else:
        question = rng.choice((question, *shapes_task.COLOR_PARAPHRASES))
        messages = build_messages(f"<image>{question}", 1, PromptSettings())
        target, colour = shapes_task.response("color", answer), answer
    encoded = encode_prompt(processor, render_prompt(processor, messages), [image])
    prompt_ids = encoded["input_ids"][0].tolist()
    answer_ids = processor.tokenizer(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
    images = {"pixel_values": encoded["pixel_values"], "image_grid_thw": encoded["image_grid_thw"]}
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, images, colour


def _batch(processor, rng: random.Random, size: int, question_writing: float) -> dict:
    examples = [_example(processor, rng, question_writing) for _ in range(size)]
    width = max(len(e[0]) for e in examples)
    pad = processor.tokenizer.pad_token_id
    ids = torch.full((size, width), pad)
    labels = torch.full((size, width), -100)
    mask = torch.zeros((size, width), dtype=torch.long)
    for row, (tokens, targets, _, _) in enumerate(examples):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, :len(targets)] = torch.tensor(targets)
        mask[row, :len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "colours": [e[3] for e in examples],
            "pixel_values": torch.cat([e[2]["pixel_values"] for e in examples]),
            "image_grid_thw": torch.cat([e[2]["image_grid_thw"] for e in examples])}


def _loss(logits: torch.Tensor, batch: dict, colour_ids: dict[str, int], noise: float) -> torch.Tensor:
    """Next-token cross-entropy on the answers. With noise, the first colour token's target is soft:
    the right colour with probability 1 - noise, each other colour with noise / (colours - 1). Soft
    targets make every image's answer distribution equally flat (sampled hard wrong labels leave
    some colours near chance and others sharp, and then the majority vote is often wrong)."""
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100,
                                                  reduction="none")
    if noise > 0:
        ids = torch.tensor(list(colour_ids.values()))
        for row, colour in enumerate(batch["colours"]):
            if colour is None:
                continue
            pos = int((labels[row] == colour_ids[colour]).nonzero()[0])  # the first mention of the colour
            target = torch.full((len(ids),), noise / (len(ids) - 1))
            target[list(colour_ids).index(colour)] = 1 - noise
            logprobs = torch.log_softmax(logits[row, pos].float(), -1)[ids]
            per_token[row, pos] = -(target * logprobs).sum()
    return per_token.sum() / (labels != -100).sum()


def _train(model, processor, rng: random.Random, steps: int, lr: float, noise: float, recipe: BaseRecipe,
           stage: str) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    colour_ids = colour_token_ids(processor.tokenizer)
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc=f"make-base ({stage})", unit="step", dynamic_ncols=True):
        batch = _batch(processor, rng, recipe.batch_size, recipe.question_writing)
        logits = model(**forward_inputs(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                        batch["image_grid_thw"])).logits
        loss = _loss(logits, batch, colour_ids, noise)
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
