"""Tiny vision-language models built locally for the tests (random init, nothing downloaded): a LLaVA-style model
(LlavaForConditionalGeneration: a tiny CLIP vision tower + a tiny Llama) and a Qwen2-VL-style one, each saved with a
processor built offline (the test tokenizer with image tokens + an image processor constructed in code) and a
Llama-3-style chat template that renders content parts (turns end in <|eot_id|>, nothing after it)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image
from tokenizers import AddedToken

from helpers import make_tokenizer

# The template renders a message's content parts in order: an image part as the processor's image placeholder, a
# text part as its text; plain string content as it is.
VLM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_PLACEHOLDER{% elif part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def _tokenizer(image_tokens: list[str]):
    tokenizer = make_tokenizer(chat_template="llama3")
    tokenizer.add_tokens([AddedToken(t, special=True) for t in image_tokens])
    return tokenizer


def make_llava(directory: str | Path, seed: int = 0, initializer_range: float = 0.3) -> str:
    """A tiny LLaVA saved with its processor in `directory` (32x32 images, 4x4 patches of 16 pixels: 4 image
    tokens per image)."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = _tokenizer(["<image>"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=0, pad_token_id=0,
                       initializer_range=initializer_range, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=16)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=4,
                         projector_hidden_act="gelu", initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1,
                               chat_template=VLM_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>"))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


def make_qwen2_vl(directory: str | Path, seed: int = 0, initializer_range: float = 0.3) -> str:
    """A tiny Qwen2-VL saved with its processor in `directory` (images resized to 56x56: 14-pixel patches merged
    2x2, so 4 image tokens per image)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                           "<|video_pad|>")}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                bos_token_id=tokenizer.bos_token_id, eos_token_id=0, pad_token_id=0,
                initializer_range=initializer_range, tie_word_embeddings=False)
    vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=initializer_range)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    # transformers 5 builds Qwen2VLProcessor with a video processor, which needs torchvision (not installed here):
    # the processor's parts are saved one by one, and dpokit.models.vision.load_processor builds it without videos
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    image_processor.save_pretrained(directory)
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    tokenizer.chat_template = VLM_TEMPLATE.replace("IMAGE_PLACEHOLDER", placeholder)
    tokenizer.save_pretrained(directory)
    (Path(directory) / "chat_template.jinja").write_text(tokenizer.chat_template)
    (Path(directory) / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    return str(directory)


def shape_image(colour: str, shape: str = "square", size: int = 32) -> Image.Image:
    """A coloured shape on white."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pixels = image.load()
    for x in range(size):
        for y in range(size):
            inside = (abs(x - size / 2) < size / 4 and abs(y - size / 2) < size / 4) if shape == "square" else \
                ((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2)
            if inside:
                pixels[x, y] = COLOURS[colour]
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
