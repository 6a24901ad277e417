"""Sampling: prompts (plain text or chat messages) -> continuations, batched, length-sorted and KV-cached.

Every place dpokit samples (`dpokit generate`, :func:`generate`, the demo) goes through :func:`sample_ids`, so
a prompt is tokenised the same way everywhere, and exactly as training tokenises it
(:func:`dpokit.data.chat.prompt_token_ids`):

* **Chat template.** When the tokenizer has one (``chat_template=None``, the default) every prompt is rendered
  with it and its generation prompt: a string becomes one user turn, a list of ``{"role", "content"}`` messages
  is rendered as it is, and ``system`` is put first where the conversation has no system message of its own.
  ``chat_template=False`` sends plain text as it is (a message list is then an error).
* **Stop.** Generation stops at EOS, at the model's own ``generation_config.eos_token_id`` (chat models list
  their end-of-turn tokens there), and at the chat template's end-of-turn token (``<|im_end|>``,
  ``<|eot_id|>``): the token training scores as the end of a response. A sample's ids run through the first
  stop token it emits; its text leaves special tokens out.
* **Batches.** Sequences (prompts × samples) are sorted by prompt length so that a batch holds prompts of
  similar length (less left padding), sampled ``batch_size`` at a time with the key/value cache, with a
  progress bar when there is more than one batch. The results come back in the prompts' order.
* **Seeds.** ``seed`` seeds torch before sampling: the same prompts, options and seed give the same outputs.
* **Images.** A vision-language model (its tokenizer carries its processor: dpokit.models.loading) renders each
  prompt with the processor's chat template and runs it through the processor with the prompt's images
  (:class:`dpokit.data.records.ImagePrompt`), as training does (dpokit.data.vision); its prompts are sampled one at a
  time, all their samples together. A text model given images is an error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpokit.config.eval import GenerateConfig
from dpokit.config.options import defaults_of
from dpokit.errors import ConfigError, DataError
from dpokit.runtime.threads import apply_threads, model_width
from dpokit.data.prompts import Prompt
from dpokit.data.chat import end_of_turn_id, has_chat_template, prompt_token_ids, render_chat, user_turn
from dpokit.data.arrays import text_bound
from dpokit.data.records import ToolPrompt, images_of, tools_of
from dpokit.data.vision import processor_of


@dataclass(frozen=True)
class Sample:
    """One sampled continuation: the prompt ids, the generated ids (through the stop token if one was emitted),
    its text, and the conversation sent (the messages, system included) when the chat template was applied."""

    prompt_ids: list[int]
    ids: list[int]
    text: str
    messages: list[dict] | None = None


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: bool | None) -> bool:
    """Whether prompts are rendered with the chat template: `chat_template`, or when None whether the tokenizer
    has one. Asking for it from a tokenizer without one is an error."""
    if chat_template is None:
        return has_chat_template(tokenizer)
    if chat_template and not has_chat_template(tokenizer):
        raise ConfigError("the tokenizer has no chat template to apply (leave out --chat-template)")
    return bool(chat_template)


def conversation(prompt: Prompt, system: str | None = None) -> list[dict]:
    """`prompt` as messages: a string as one user turn; `system` first unless the messages start with one; a
    ToolPrompt's tools kept."""
    messages = user_turn(prompt) if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return ToolPrompt(messages, tools_of(prompt)) if tools_of(prompt) else messages


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], *, chat_template: bool | None = None,
                   system: str | None = None) -> tuple[list[list[int]], list[list[dict] | None]]:
    """The token ids of each prompt, and the conversation sent for each (None where the text is sent raw)."""
    chat = uses_chat_template(tokenizer, chat_template)
    if not chat:
        if system is not None:
            raise ConfigError("--system needs the chat template (the tokenizer has none, or --no-chat-template)")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ConfigError(f"prompt {i + 1} is a list of messages, which needs the chat template (the "
                                  "tokenizer has none, or --no-chat-template was given)")
        return [prompt_token_ids(tokenizer, p) for p in prompts], [None] * len(prompts)
    messages = [conversation(p, system) for p in prompts]
    return [prompt_token_ids(tokenizer, m, f"prompt {i + 1}", tools_of(m)) for i, m in enumerate(messages)], messages


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, policy: PreTrainedModel | None = None,
                   chat: bool = True) -> list[int]:
    """The tokens that end a sample: EOS, the model's generation-config EOS ids, and (with `chat`) the chat
    template's end-of-turn token."""
    stops: list[int] = []
    candidates = [tokenizer.eos_token_id]
    configured = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    candidates += configured if isinstance(configured, list) else [configured]
    if chat:
        candidates.append(end_of_turn_id(tokenizer))
    for token in candidates:
        if token is not None and token not in stops:
            stops.append(int(token))
    if not stops:
        raise ConfigError("the tokenizer has no EOS token and the model names none: sampling would never stop")
    return stops


# the sampling options' defaults: GenerateConfig's declarations (the ones `dpokit generate` shows)
_D = defaults_of(GenerateConfig)


def _check_options(**options) -> None:
    """The sampling options checked against their declarations (GenerateConfig): ranges and types."""
    known = {name: options[name] for name in ("max_new_tokens", "temperature", "top_p", "num_samples", "batch_size")
             if name in options}
    GenerateConfig(model="-", prompt="-", **known)  # its construction checks them


def _cut(tokens: list[int], stops: set[int]) -> list[int]:
    """`tokens` through the first stop token (the rest is padding after a finished sequence)."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


def _check_prompt_sizes(prompts: Sequence[Prompt], tokenizer: PreTrainedTokenizerBase, policy: PreTrainedModel) -> None:
    """Refuse, before tokenising, a prompt of more characters than the model's maximum positions could ever
    hold in tokens (dpokit.data.arrays.text_bound): one huge line would otherwise take the tokenizer's memory."""
    positions = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    bound = text_bound(tokenizer, positions)
    for i, prompt in enumerate(prompts):
        size = len(prompt) if isinstance(prompt, str) else sum(len(str(m.get("content", ""))) for m in prompt)
        if size > bound:
            raise DataError(f"prompt {i + 1}: {size:,} characters, more than the model's {positions} positions "
                            f"could hold ({bound:,}); shorten it")


@torch.no_grad()
def sample_ids(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], *,
               max_new_tokens: int = _D["max_new_tokens"], temperature: float = _D["temperature"],
               top_p: float = _D["top_p"], num_samples: int = _D["num_samples"], seed: int = _D["seed"],
               batch_size: int = _D["batch_size"], chat_template: bool | None = _D["chat_template"],
               system: str | None = _D["system"],
               progress: bool | None = None) -> list[list[Sample]]:
    """`num_samples` continuations of each prompt from an in-memory model, with their token ids (see the module
    docstring for templating, stopping, batching and seeding).

    Temperature 0 is greedy; otherwise sampling is exact (no top-k) with nucleus `top_p`. `batch_size` counts
    sequences (prompts × samples). `progress` shows a bar of sequences sampled and new tokens per second (default: when there is more than
    one batch).
    """
    _check_options(temperature=temperature, top_p=top_p, num_samples=num_samples, max_new_tokens=max_new_tokens,
                   batch_size=batch_size)
    _check_prompt_sizes(prompts, tokenizer, policy)
    if check_images(tokenizer, prompts, chat_template):
        return sample_vision(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, num_samples=num_samples, seed=seed, system=system, progress=progress)
    encoded, messages = render_prompts(tokenizer, prompts, chat_template=chat_template, system=system)
    if not prompts:
        return []
    stops = stop_token_ids(tokenizer, policy, chat=messages[0] is not None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    torch.manual_seed(seed)
    policy.eval()
    policy.generation_config.max_length = None  # max_new_tokens decides; silences transformers' warning
    device = next(policy.parameters()).device
    # the thread count for this model (dpokit.runtime.threads); stderr, so that stdout holds only the samples
    apply_threads(width=model_width(policy), device=device, log=lambda line: print(line, file=sys.stderr))
    # every (prompt, sample) sequence, shortest prompts first (a stable sort: ties keep the prompts' order)
    order = sorted(((i, k) for i in range(len(prompts)) for k in range(num_samples)), key=lambda s: len(encoded[s[0]]))
    results: list[list[Sample | None]] = [[None] * num_samples for _ in prompts]
    batches = range(0, len(order), batch_size)
    show = len(batches) > 1 if progress is None else progress
    bar = tqdm(total=len(order), desc="generating", unit=" samples", disable=not show)
    new_tokens = 0
    for start in batches:
        batch = order[start : start + batch_size]
        rows = [encoded[i] for i, _ in batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        generated = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    pad_token_id=pad, eos_token_id=stops, use_cache=True, **sampling)
        for (i, k), tokens in zip(batch, generated[:, width:].tolist()):
            tokens = _cut(tokens, set(stops))
            results[i][k] = Sample(encoded[i], tokens, tokenizer.decode(tokens, skip_special_tokens=True),
                                   messages[i])
            new_tokens += len(tokens)
        if show:  # the postfix first: update() redraws the bar with it
            elapsed = max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"{new_tokens / elapsed:.0f} new tokens/s", refresh=False)
        bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]  (every slot is filled)


def check_images(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], chat_template: bool | None) -> bool:
    """Whether the prompts go through a vision-language model's processor (its tokenizer carries one); a prompt
    with images for a text model, or --no-chat-template for a VLM, is a ConfigError."""
    if processor_of(tokenizer) is None:
        with_images = next((i for i, p in enumerate(prompts) if images_of(p)), None)
        if with_images is not None:
            raise ConfigError(f"prompt {with_images + 1} has images but the model is a text-only model (its config "
                              "has no vision_config); images need a vision-language model")
        return False
    if chat_template is False:
        raise ConfigError("a vision-language model renders its prompts with its processor's chat template; "
                          "leave out --no-chat-template")
    return True


def _vision_inputs(processor, messages: list[dict], images, where: str, num_samples: int, device) -> dict:
    """The processor's inputs for one prompt (its text from the chat template, its images), `num_samples` rows."""
    text, _ = render_chat(processor, messages, [], where, tools_of(messages))
    kwargs = {"images": list(images)} if images else {}
    try:
        out = processor(text=[text], add_special_tokens=False, return_tensors="pt", **kwargs)
    except (ValueError, TypeError, OSError) as error:
        raise DataError(f"{where}: the processor refused the prompt and its images: "
                        f"{str(error).splitlines()[0]}") from None
    width = out["input_ids"].shape
    return {key: (value.repeat(num_samples, 1) if value.shape == width else
                  torch.cat([value] * num_samples)).to(device)  # per-token rows, or images along dimension 0
            for key, value in out.items() if isinstance(value, torch.Tensor)}


@torch.no_grad()
def sample_vision(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], *,
                  max_new_tokens: int, temperature: float, top_p: float, num_samples: int, seed: int,
                  system: str | None, progress: bool | None) -> list[list[Sample]]:
    """:func:`sample_ids` for a vision-language model: each prompt through the processor with its images, its
    `num_samples` samples generated together."""
    processor = processor_of(tokenizer)
    stops = stop_token_ids(tokenizer, policy, chat=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    torch.manual_seed(seed)
    policy.eval()
    policy.generation_config.max_length = None
    device = next(policy.parameters()).device
    apply_threads(width=model_width(policy), device=device, log=lambda line: print(line, file=sys.stderr))
    results = []
    show = len(prompts) > 1 if progress is None else progress
    for i, prompt in enumerate(tqdm(prompts, desc="generating", unit=" prompts", disable=not show)):
        messages = conversation(prompt, system)
        inputs = _vision_inputs(processor, messages, images_of(prompt), f"prompt {i + 1}", num_samples, device)
        width = inputs["input_ids"].shape[1]
        generated = policy.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops,
                                    use_cache=True, **sampling)
        prompt_ids = inputs["input_ids"][0].tolist()
        group = []
        for tokens in generated[:, width:].tolist():
            tokens = _cut(tokens, set(stops))
            group.append(Sample(prompt_ids, tokens, tokenizer.decode(tokens, skip_special_tokens=True), messages))
        results.append(group)
    return results


def sample(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
           **options) -> list[list[str]]:
    """The texts of :func:`sample_ids` (same options)."""
    return [[s.text for s in group] for group in sample_ids(policy, tokenizer, prompts, **options)]


def generate_samples(model: str, prompts: Sequence[Prompt], *, gguf_file: str | None = None,
                     **options) -> list[list[Sample]]:
    """Load `model` (a model or LoRA adapter directory, or a hub name; `gguf_file`: a GGUF checkpoint in that
    directory, dequantised) and sample from it: :func:`sample_ids`."""
    from dpokit.models.loading import load_model, load_tokenizer

    _check_options(**options)
    tokenizer = load_tokenizer(model, gguf_file=gguf_file)
    # bad prompts and options fail here, before the (slow) model load
    if not check_images(tokenizer, prompts, options.get("chat_template")):
        render_prompts(tokenizer, prompts, chat_template=options.get("chat_template"), system=options.get("system"))
    return sample_ids(load_model(model, gguf_file=gguf_file), tokenizer, prompts, **options)


def generate(model: str, prompts: Sequence[Prompt], *, max_new_tokens: int = _D["max_new_tokens"],
             temperature: float = _D["temperature"], top_p: float = _D["top_p"], num_samples: int = _D["num_samples"],
             seed: int = _D["seed"], batch_size: int = _D["batch_size"], chat_template: bool | None = _D["chat_template"],
             system: str | None = _D["system"],
             progress: bool | None = None, gguf_file: str | None = None) -> list[list[str]]:
    """Sample `num_samples` continuations (replies, for a chat model) of each prompt; greedy when temperature is 0.

    A prompt is a string or a list of chat messages. The tokenizer's chat template is applied when it has one
    (``chat_template=False`` sends raw text); `system` is a system message put before each conversation.
    """
    samples = generate_samples(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               num_samples=num_samples, seed=seed, batch_size=batch_size,
                               chat_template=chat_template, system=system, progress=progress, gguf_file=gguf_file)
    return [[s.text for s in group] for group in samples]
