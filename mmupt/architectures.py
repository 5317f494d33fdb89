"""Model architectures for planning and benchmarks, with exact parameter counts.

The full-size Qwen2.5-VL configurations are public facts, copied from the `config.json` files of
`Qwen/Qwen2.5-VL-3B-Instruct` and `Qwen/Qwen2.5-VL-7B-Instruct` (as mirrored in public repositories;
the 7B has 8.29 B parameters, the 3B 3.75 B with tied embeddings). They let `mmupt run --dry-run`
plan a run before the weights are downloaded, and `bench/gpu.py` build a randomly initialised model
of the real size without a hub. Parameters are counted by building the model on PyTorch's `meta`
device (no memory is allocated), so every count is exact for the installed transformers.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# Shared by both sizes: the 32-block vision tower (window attention, 4 full-attention blocks).
_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
           "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "in_chans": 3,
           "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"}
_TEXT = {"hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}
# Qwen2.5-VL's special token ids in its own tokenizer.
PUBLIC_TOKEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655,
                    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}

QWEN2_5_VL = {
    "3b": {"name": "Qwen2.5-VL-3B-Instruct",
           "text": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                    "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
           "vision_out": 2048},
    "7b": {"name": "Qwen2.5-VL-7B-Instruct",
           "text": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
           "vision_out": 3584},
}


class ArchitectureError(ValueError):
    """No architecture can be found for a model folder; the message says what to do."""


@dataclass(frozen=True)
class Architecture:
    name: str
    source: str                # where the numbers come from
    params: int                # every parameter (tied embeddings counted once)
    vision_params: int         # the vision tower, merger included
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    tied_embeddings: bool

    @property
    def language_matmul_params(self) -> int:
        """Language weights used in matrix products per token: all but the input embedding table
        (which, when tied, is also the output projection and so is counted once)."""
        embedding = self.vocab_size * self.hidden_size
        return self.language_params - (0 if self.tied_embeddings else embedding)

    @property
    def language_params(self) -> int:
        return self.params - self.vision_params


def public_config(size: str, token_ids: dict[str, int] | None = None, vocab_size: int | None = None):
    """A transformers `Qwen2_5_VLConfig` of the public 3B or 7B architecture.

    `token_ids` and `vocab_size` replace the public special-token ids and vocabulary (bench/gpu.py pairs
    the real-size network with an offline tokenizer); the network itself is unchanged.
    """
    from transformers import Qwen2_5_VLConfig

    if size not in QWEN2_5_VL:
        raise ArchitectureError(f"unknown Qwen2.5-VL size {size!r} (known: {', '.join(QWEN2_5_VL)})")
    spec = QWEN2_5_VL[size]
    ids = dict(PUBLIC_TOKEN_IDS, **(token_ids or {}))
    text = dict(_TEXT, **spec["text"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(_VISION, out_hidden_size=spec["vision_out"]),
        tie_word_embeddings=spec["text"]["tie_word_embeddings"],
        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})


def describe(config, name: str, source: str) -> Architecture:
    """Count the parameters of `config` exactly by building the model on the meta device."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    visual = getattr(model, "visual", None) or model.model.visual
    text = config.text_config
    heads = text.num_attention_heads
    return Architecture(
        name=name, source=source, params=params, vision_params=sum(p.numel() for p in visual.parameters()),
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        layers=text.num_hidden_layers, heads=heads, kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vision_depth=config.vision_config.depth, vision_hidden_size=config.vision_config.hidden_size,
        vision_intermediate_size=config.vision_config.intermediate_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)))


def size_from_name(folder: str) -> str | None:
    """'Qwen2.5-VL-7B-Instruct' (or qwen2_5_vl_7b ...) -> '7b'; None when the name says nothing."""
    match = re.search(r"qwen2[._]?5[-_]?vl[-_]?(\d+)b", folder.lower())
    return f"{match.group(1)}b" if match and f"{match.group(1)}b" in QWEN2_5_VL else None


def find_architecture(model_path: str | Path) -> Architecture:
    """The model folder's own config.json when present, else the public config its name names."""
    path = Path(model_path)
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        name = json.loads((path / "config.json").read_text()).get("_name_or_path") or path.name
        return describe(config, name, "its config.json")
    size = size_from_name(path.name)
    if size is None:
        raise ArchitectureError(
            f"model folder {path} has no config.json here and its name does not name a known architecture "
            f"(Qwen2.5-VL-{', '.join(s.upper() for s in QWEN2_5_VL)}); plan on a machine that has the folder")
    spec = QWEN2_5_VL[size]
    return describe(public_config(size), spec["name"], "public config; the folder is not on this machine")
