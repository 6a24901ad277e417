"""Preference pairs with images -> token ids and the processor's image inputs, for vision-language models.

The rules are the text rules of dpokit.data.tokenize for conversational data, through the processor:

* **Boundary.** The prompt (its image parts included) is rendered with the processor's chat template and
  ``add_generation_prompt=True`` and run through the processor with the row's images, which expands each image
  placeholder into the model's image tokens and gives the pixel values (and the model's other image inputs:
  Qwen2-VL's ``image_grid_thw``, per-token ``mm_token_type_ids`` or ``token_type_ids``). Each response is the text
  the full conversation adds after the prompt, trailing whitespace stripped, tokenised alone without special tokens;
  EOS is appended unless it ends with a special token (the template's end of turn).
* **No prompt truncation.** Cutting a prompt would cut image tokens from their image: a pair whose prompt + longest
  response exceeds ``max_length`` is filtered (``on_filtered`` applies), never cut.
* **Layout.** Image examples take any of dpokit.data.batching's layouts: in the plain one a row per response, the
  prompt and its images given once per response; in the shared-prompt and packed ones the prompt once per pair,
  so its images are given once per example. :func:`stack_vision` lays out a batch's image inputs in the order the
  model meets the image tokens (row by row, left to right), which is the order models that scatter image
  features into the image-token positions (LLaVA) read them in. Whether a model may take the shared or packed
  layout with images is the model layer's question (dpokit.models.logprobs.check_layout: Qwen2-VL's multimodal
  rotary positions rule it out); where it may not, the plain layout is used.

The processor travels with the tokenizer: dpokit.models.loading attaches it (:func:`attach_processor`) when the model
is a vision-language model, so every layer keeps taking a tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dpokit.data.chat import _special_ids, assistant_turn, render_chat
from dpokit.data.records import Completion, PreferencePair
from dpokit.data.tokenize import FilterReport, TokenizeConfig, TokenizedExample, check_report
from dpokit.errors import ConfigError, DataError

TEXT_KEYS = ("input_ids", "attention_mask")
TOO_LONG = "longer than max_length (prompts with images are never truncated)"
IDENTICAL = "identical chosen and rejected"


@dataclass(frozen=True)
class VisionExample(TokenizedExample):
    """A TokenizedExample whose prompt holds image tokens: `vision` holds the processor's image inputs of the prompt
    (``pixel_values``, ``image_grid_thw``, ...: a tensor per key, images along the first dimension) and `per_token`
    its per-token inputs (``mm_token_type_ids``, ``token_type_ids``: one value per prompt token)."""

    vision: dict = field(default_factory=dict, compare=False)
    per_token: dict = field(default_factory=dict, compare=False)


def attach_processor(tokenizer, processor) -> None:
    """Let `tokenizer` carry the processor of its vision-language model (read back with :func:`processor_of`); its
    ``save_pretrained`` then saves the processor's files too, so that every model directory dpokit writes
    (checkpoints, final/) loads back as the vision-language model it is."""
    tokenizer.dpokit_processor = processor
    save_tokenizer = tokenizer.save_pretrained
    busy = []

    def save_pretrained(directory, *args, **kwargs):
        if busy:  # the processor saving its tokenizer
            return save_tokenizer(directory, *args, **kwargs)
        busy.append(True)
        try:
            out = save_tokenizer(directory, *args, **kwargs)
            _save_processor(processor, directory)
            return out
        finally:
            busy.clear()

    tokenizer.save_pretrained = save_pretrained


def _save_processor(processor, directory) -> None:
    """The processor's files in `directory`: its own save_pretrained, or for one built without its video processor
    (dpokit.models.vision.load_processor) its image processor, chat template and class name."""
    import json
    from pathlib import Path

    try:
        processor.save_pretrained(directory)
    except AttributeError:
        processor.image_processor.save_pretrained(directory)
        if processor.chat_template:
            (Path(directory) / "chat_template.jinja").write_text(processor.chat_template)
        (Path(directory) / "processor_config.json").write_text(json.dumps({"processor_class":
                                                                           type(processor).__name__}))


def processor_of(tokenizer):
    """The processor attached to `tokenizer`, or None for a text model's tokenizer."""
    return getattr(tokenizer, "dpokit_processor", None)


def check_modalities(records: Sequence, tokenizer, data: str) -> None:
    """A vision-language model needs rows with images; a text model cannot take them: ConfigErrors naming the data
    file and the first row with images."""
    with_images = next((r for r in records if getattr(r, "images", None)), None)
    if processor_of(tokenizer) is not None and with_images is None:
        raise ConfigError(f"{data}: the model is a vision-language model but no row has images (field 'images'); "
                          "give pairs with images, or train its language model as a text model")
    if processor_of(tokenizer) is None and with_images is not None:
        raise ConfigError(f"{with_images.source}: field 'images' holds images but the model is a text-only model "
                          "(its config has no vision_config); use a vision-language model or drop the images")


def _response_ids(tokenizer, text: str, special: set[int]) -> tuple[int, ...]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids or ids[-1] not in special:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)


def _turns(response) -> list[dict]:
    """A response as the assistant turns it adds to the conversation (a string: one assistant turn)."""
    return assistant_turn(response) if isinstance(response, str) else response


def tokenize_vision_pair(record: PreferencePair | Completion, processor, special: set[int]) -> VisionExample:
    """One pair (or SFT completion) with images as token ids and image inputs (the module's rules, before the
    length filter)."""
    if not isinstance(record.prompt, list):
        raise DataError(f"{record.source}: a vision-language model needs a conversational prompt (a list of "
                        "messages)")
    tokenizer = processor.tokenizer
    responses = [record.completion] if isinstance(record, Completion) else [record.chosen, record.rejected]
    prompt_text, texts = render_chat(processor, record.prompt, [_turns(r) for r in responses], record.source,
                                     record.tools)
    kwargs = {"images": list(record.images)} if record.images else {}
    try:
        out = processor(text=[prompt_text], add_special_tokens=False, return_tensors="pt", **kwargs)
    except (ValueError, TypeError, OSError) as error:
        raise DataError(f"{record.source}: the processor refused the prompt and its images: "
                        f"{str(error).splitlines()[0]}") from None
    prompt_ids = out["input_ids"][0]
    vision, per_token = {}, {}
    for key, value in out.items():
        if key in TEXT_KEYS or not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 2 and value.shape == out["input_ids"].shape and key.endswith("token_type_ids"):
            per_token[key] = value[0].clone()
        else:
            vision[key] = value
    responses = tuple(_response_ids(tokenizer, t, special) for t in texts)
    return VisionExample(tuple(prompt_ids.tolist()), responses, record.source, vision, per_token)


def tokenize_vision_examples(records: Sequence[PreferencePair | Completion], tokenizer, config: TokenizeConfig, *,
                             description: str = "tokenising", sink=None) -> tuple[list[VisionExample], FilterReport]:
    """Tokenise preference pairs for the vision-language model whose processor `tokenizer` carries; filtered pairs
    are counted in the report and ``config.on_filtered`` applies as for text. `sink` must be None: image examples
    are not cached on disk (the signature is dpokit.data.tokenize.tokenize_examples')."""
    if sink is not None:
        raise ConfigError("image examples cannot be cached on disk")
    processor = processor_of(tokenizer)
    if processor is None:
        raise ConfigError("tokenize_vision_examples needs a tokenizer with a processor (attach_processor)")
    special = _special_ids(processor.tokenizer)
    report = FilterReport()
    examples = []
    for record in records:
        example = tokenize_vision_pair(record, processor, special)
        if len(example.responses) == 2 and example.responses[0] == example.responses[1]:
            report.add(IDENTICAL, record.source)
        elif len(example.prompt_ids) + max(len(r) for r in example.responses) > config.max_length:
            report.add(TOO_LONG, record.source)
        else:
            examples.append(example)
    report.kept = len(examples)
    check_report(report, config)
    return examples, report


def has_vision(examples: Sequence[TokenizedExample]) -> bool:
    """Whether `examples` carry image inputs."""
    return any(isinstance(e, VisionExample) for e in examples)


def stack_vision(placements: Sequence[tuple[TokenizedExample, int, int]], rows: int, width: int) -> dict:
    """The image inputs of a batch of `rows` x `width` tokens whose prompts are placed at `placements`: (example,
    row, column of its prompt's first token), in the order the model meets them (row by row, left to right; an
    example placed once per response in the plain layout, once in the others). Each key's tensors are concatenated
    along images in that order; each per-token key is a ``[rows, width]`` tensor (its values over the prompt's
    columns, zeros elsewhere). Text examples among them add nothing."""
    vision: dict[str, list] = {}
    per_token: dict[str, torch.Tensor] = {}
    for example, row, column in placements:
        if not isinstance(example, VisionExample):
            continue
        for key, value in example.vision.items():
            vision.setdefault(key, []).append(value)
        for key, value in example.per_token.items():
            target = per_token.setdefault(key, torch.zeros(rows, width, dtype=value.dtype))
            target[row, column : column + len(value)] = value
    return {**{k: torch.cat(v) for k, v in vision.items()}, **per_token}


def vision_digest(examples: Sequence[TokenizedExample]) -> str:
    """A sha256 of every example's image inputs (each key's name, dtype, shape and bytes), in order: what the model
    sees of the images, which the token ids do not show (an image's tokens are the same whatever its pixels).
    Empty for text examples. It reads every pixel value once (about a millisecond per 336x336 image)."""
    import hashlib

    digest = hashlib.sha256()
    for index, example in enumerate(examples):
        if not isinstance(example, VisionExample):
            continue
        for key, value in sorted({**example.vision, **example.per_token}.items()):
            value = value.detach().cpu().contiguous()
            digest.update(f"{index}|{key}|{value.dtype}|{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()
