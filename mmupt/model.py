"""Model loading for any Hugging Face-format Qwen2.5-VL folder, the tiny offline model, and prompts.

The same functions load the real Qwen2.5-VL-7B on GPUs and the tiny model built here from a config
with a tokenizer trained offline; nothing touches a model hub.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch

from .config import ModelSettings, PromptSettings

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
# Qwen2.5-VL's special tokens. Vision and control tokens must never be sampled: a sampled
# <|image_pad|> makes the completion unusable as model input later.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
STOP_TOKENS = ["<|im_end|>", "<|endoftext|>"]
TINY_MARKER = "mmupt_tiny.json"

# A Qwen2-VL-style chat template (default system message; image parts become vision tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class PromptError(ValueError):
    """A problem that cannot be turned into a prompt (e.g. placeholders do not match images)."""


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_processor(settings: ModelSettings):
    from transformers import AutoProcessor

    # Qwen's smart resize keeps the image area within [min_pixels, max_pixels].
    size = {"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels}
    return AutoProcessor.from_pretrained(settings.path, size=size)


def load_model(settings: ModelSettings, device: torch.device | None = None):
    from transformers import AutoModelForImageTextToText

    device = device or resolve_device(settings.device)
    model = AutoModelForImageTextToText.from_pretrained(settings.path, dtype=torch_dtype(settings.dtype))
    return model.to(device)


def ensure_model(settings: ModelSettings) -> Path:
    """Return the model folder, building the tiny model (or the tiny base) there if allowed and missing."""
    path = Path(settings.path)
    if (path / "config.json").is_file():
        return path
    if settings.build_if_missing == "no":
        raise FileNotFoundError(f"model folder {path} has no config.json (set model.build_if_missing to "
                                "'tiny' or 'tiny-base' to build the demo model there)")
    if settings.build_if_missing == "tiny":
        build_tiny(path)
    else:
        from .make_base import build_base  # noqa: PLC0415

        build_base(path)
    return path


def banned_token_ids(tokenizer) -> list[int]:
    """Special tokens that may never be sampled: everything special except the stop tokens."""
    stop = set(stop_token_ids(tokenizer))
    ids = {tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    ids |= set(getattr(tokenizer, "all_special_ids", []))
    return sorted(i for i in ids if i is not None and i >= 0 and i not in stop and i != tokenizer.unk_token_id)


def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({i for i in ids if i is not None and i >= 0 and i != tokenizer.unk_token_id})


# ---- prompts ------------------------------------------------------------------------------------
def build_messages(problem: str, n_images: int, prompt: PromptSettings) -> list[dict]:
    """MM-UPT problem text with `<image>` placeholders -> chat messages (the paper's prompt)."""
    pieces = problem.split(IMAGE_PLACEHOLDER)
    placeholders = len(pieces) - 1
    if placeholders == 0 and n_images:
        pieces = [""] * n_images + [problem]  # no placeholder: images first, then the text
    elif placeholders != n_images:
        raise PromptError(f"problem has {placeholders} {IMAGE_PLACEHOLDER} placeholders but {n_images} images")
    content: list[dict] = []
    for i, piece in enumerate(pieces):
        if piece:
            content.append({"type": "text", "text": piece})
        if i < len(pieces) - 1:
            content.append({"type": "image"})
    content.append({"type": "text", "text": prompt.suffix.lstrip() if not pieces[-1] else prompt.suffix})
    messages = [{"role": "user", "content": content}]
    if prompt.system is not None:
        messages.insert(0, {"role": "system", "content": prompt.system})
    return messages


def render_prompt(processor, messages: list[dict]) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(processor, text: str, images: list) -> dict[str, torch.Tensor]:
    """Prompt text + PIL images -> model inputs (batch of one), image tokens expanded."""
    kwargs = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    return dict(processor(**kwargs))


def forward_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values=None,
                   image_grid_thw=None) -> dict[str, torch.Tensor]:
    """Inputs for a training/scoring forward pass of a Qwen2.5-VL.

    Newer transformers compute M-RoPE positions only when `mm_token_type_ids` (0 text, 1 image,
    2 video) is given; without it a forward silently falls back to 1-D positions. Derive it from the
    token ids when the installed version expects it.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if pixel_values is not None:
        kwargs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        cfg = model.config
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == cfg.image_token_id] = 1
        types[input_ids == cfg.video_token_id] = 2
        kwargs["mm_token_type_ids"] = types
    return kwargs


# ---- the tiny offline model ---------------------------------------------------------------------
def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from . import shapes_task

    suffix = PromptSettings().suffix
    corpus = [line + suffix for line in shapes_task.corpus()] + shapes_task.corpus()
    corpus += ["system\nYou are a helpful assistant.\nuser\nassistant\n", "Please reason step by step."]
    corpus = corpus * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(path: str | Path, seed: int = 0, vocab_size: int = 512, image_side: int = 112,
               hidden: int = 64, layers: int = 2, vision_hidden: int = 32, vision_depth: int = 2) -> Path:
    """Build and save a tiny Qwen2.5-VL (~0.2M parameters by default) with an offline tokenizer and processor."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    path = Path(path)
    tokenizer = _train_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    pixels = {"min_pixels": 56 * 56, "max_pixels": image_side * image_side, "patch_size": 14, "merge_size": 2,
              "temporal_patch_size": 2}
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                    video_processor=Qwen2VLVideoProcessor(**pixels),
                                    tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    heads = 4
    head_dim = hidden // heads  # mrope_section must sum to head_dim / 2
    mrope = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
    mrope.append(head_dim // 2 - sum(mrope))
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1],
                           window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    recipe = {"seed": seed, "vocab_size": vocab_size, "hidden": hidden, "layers": layers,
              "vision_hidden": vision_hidden, "vision_depth": vision_depth,
              "parameters": sum(p.numel() for p in model.parameters())}
    (path / TINY_MARKER).write_text(json.dumps(recipe, indent=2))
    log.info("built tiny Qwen2.5-VL (%d parameters) at %s", recipe["parameters"], path)
    return path
