"""The implicit reward of a DPO policy as a reward model: r(x, y) = β · (log π(y|x) − log π_ref(y|x)).

DPO's policy defines the reward it was trained on (Rafailov et al. 2023, Eq. 5) up to β·log Z(x), a term of the
prompt alone: it cancels between responses to one prompt, so the ranking of the responses of a prompt (best-of-N)
is the reward model's, while the rewards of responses to different prompts are not comparable in general.

The log-probs are dpokit's own (tokenize.py, batching.py, logprobs.py): each (prompt, response) is tokenised under
the rules dpokit dpo trains with (chat template, EOS, prompt truncation) and its response tokens are summed exactly
as dpokit eval sums them, so a pair's two rewards here are the rewards/chosen and rewards/rejected dpokit eval
averages, and their order is its rewards/accuracies. A prompt's tools (a data set's ``tools`` column, or a
ToolPrompt's) go to the chat template with the conversation, as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpokit.data.batching import collate
from dpokit.config import Default
from dpokit.config.data import TokenizeOptions
from dpokit.config.loss import LossOptions
from dpokit.config.options import check_options, defaults_of
from dpokit.data.records import Completion, Text, tools_of
from dpokit.train.engine import Scorer
from dpokit.errors import ConfigError, DataError
from dpokit.models.logprobs import check_layout
from dpokit.data.chat import prompt_token_ids, user_turn
from dpokit.data.tokenize import FilterReport, TokenizeConfig, TokenizedExample, examples_from_arrays, tokenize_arrays


BETA = defaults_of(LossOptions)["beta"]  # the training β: the reward of a policy trained with the defaults

@dataclass(frozen=True)
class ImplicitReward:
    """The implicit reward of one (prompt, response), with the summed response log-probs it comes from.

    ``skipped`` says why a response was not scored (it does not fit in max_length even after prompt truncation:
    responses are never cut); its numbers are then None.
    """

    reward: float | None
    logp_policy: float | None
    logp_reference: float | None
    response_tokens: int = 0  # scored tokens, EOS or end-of-turn included
    prompt_truncated: bool = False  # the prompt was cut to max_prompt_length (TokenizeConfig.truncation)
    skipped: str | None = None

    def row(self) -> dict:
        """The fields written to a JSONL row."""
        out = {"reward": self.reward, "logp_policy": self.logp_policy, "logp_reference": self.logp_reference,
               "response_tokens": self.response_tokens, "prompt_truncated": self.prompt_truncated}
        return out if self.skipped is None else {**out, "skipped": self.skipped}


def _scorer(model: nn.Module) -> Scorer:
    """`model` as a module whose forward is batch -> summed response log-probs."""
    return model if isinstance(model, Scorer) else Scorer(model)


def _device(scorer: Scorer) -> torch.device:
    return next(scorer.parameters()).device


def _pad(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def supported_layout(policy: nn.Module, reference: nn.Module, sample: Sequence[TokenizedExample], layout: str,
                     pad_token_id: int, max_length: int) -> str:
    """`layout` if both models give the plain layout's log-probs with it on `sample` and on sequences of up to
    `max_length` tokens, else "plain" (dpokit.models.logprobs.check_layout)."""
    for scorer in (_scorer(policy), _scorer(reference)):
        layout = check_layout(scorer, sample, layout, pad_token_id, device=_device(scorer), max_length=max_length)
    return layout


def _truncated(example: TokenizedExample, record: Completion, tokenizer: PreTrainedTokenizerBase,
               settings: TokenizeConfig) -> bool:
    """Whether tokenisation cut the prompt of `record`. A cut prompt is exactly max_prompt_length tokens long, so
    only those are tokenised again whole to compare."""
    if len(example.prompt_ids) != settings.max_prompt_length:
        return False
    prompt = user_turn(record.prompt) if settings.apply_chat_template and isinstance(record.prompt, str) \
        else record.prompt
    return len(prompt_token_ids(tokenizer, prompt, record.source, record.tools)) > settings.max_prompt_length


def per_input_tools(prompts: Sequence[Text], tools: Sequence[list[dict] | None] | None
                    ) -> list[list[dict] | None]:
    """The tool schemas of each input: `tools` (one entry per prompt, None for none) when given, else each
    prompt's own (a ToolPrompt's, :func:`dpokit.data.records.tools_of`)."""
    if tools is None:
        return [tools_of(p) for p in prompts]
    if len(tools) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(tools)} tools entries")
    return [t or None for t in tools]


def tokenize_responses(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Text], responses: Sequence[Text],
                       settings: TokenizeConfig, sources: Sequence[str] | None = None,
                       tools: Sequence[list[dict] | None] | None = None
                       ) -> tuple[list[TokenizedExample | None], FilterReport, list[Completion]]:
    """Tokenise each (prompt, response) as dpokit tokenises a completion: one example per input, None where it
    was filtered (too long after prompt truncation; counted in the returned report). `sources` name the inputs
    in error messages (default ``"response I"``) and must be distinct. `tools`: the tool schemas each prompt is
    offered, rendered by the chat template as training renders a row's tools column (default: the prompts'
    own, :func:`per_input_tools`)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    sources = list(sources) if sources is not None else [f"response {i}" for i in range(len(prompts))]
    where = {source: i for i, source in enumerate(sources)}
    if len(where) != len(sources) or len(sources) != len(prompts):
        raise ValueError("sources must name every (prompt, response) once")
    # a ToolPrompt is handed on as the plain list it is: the record carries its tools, as a data set's row does
    records = [Completion(list(p) if isinstance(p, list) else p, r, s, tools=t)
               for p, r, s, t in zip(prompts, responses, sources, per_input_tools(prompts, tools))]
    report = FilterReport()
    examples: list[TokenizedExample | None] = [None] * len(records)
    for arrays in tokenize_arrays(records, tokenizer, settings, report, description="tokenising"):
        for example in examples_from_arrays(arrays):
            examples[where[example.source]] = example  # kept examples come back in order, filtered ones not at all
    report.kept = sum(e is not None for e in examples)
    if report.filtered and settings.on_filtered == "error":
        raise DataError(f"{report.summary()} (pass --on-filtered skip to report them as skipped instead)")
    return examples, report, records


def _score_batches(policy: Scorer, reference: Scorer, examples: Sequence[TokenizedExample], kept: list[int],
                   beta: float, batch_size: int, layout: str, pad: int, progress: bool
                   ) -> dict[int, tuple[float, float, float]]:
    """(reward, policy log-prob, reference log-prob) of the examples at positions `kept`, `batch_size` at a time."""
    out = {}
    with tqdm(total=len(kept), desc="scoring", unit="resp", disable=not progress) as bar:
        for lo in range(0, len(kept), batch_size):
            ids = kept[lo : lo + batch_size]
            batch = collate([examples[i] for i in ids], ids, layout=layout, pad_token_id=pad)
            mine = policy(batch.to(_device(policy))).float().cpu()
            ref = reference(batch.to(_device(reference))).float().cpu()
            rewards = beta * (mine - ref)  # as losses.preference_loss computes the chosen and rejected rewards
            for k, i in enumerate(ids):
                out[i] = (rewards[k].item(), mine[k].item(), ref[k].item())
            bar.update(len(ids))
    return out


@torch.no_grad()
def implicit_rewards(policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase,
                     prompts: Sequence[Text], responses: Sequence[Text], beta: float = BETA, *,
                     settings: TokenizeConfig | None = None, batch_size: int = 16, layout: str = "packed",
                     verify_layout: bool = True, sources: Sequence[str] | None = None,
                     tools: Sequence[list[dict] | None] | None = None, progress: bool = False
                     ) -> list[ImplicitReward]:
    """The implicit reward β·(log π(y|x) − log π_ref(y|x)) of each response y to its prompt x, in input order.

    `policy` and `reference` are causal LMs (or dpokit Scorers) on the devices they are to run on; prompts and
    responses are plain text, or chat messages rendered with the tokenizer's chat template, as dpokit tokenises
    completions under `settings` (default TokenizeConfig()). Responses that do not fit are returned with
    ``skipped`` set, unless ``settings.on_filtered == "error"``, which raises DataError. Sequences are scored
    `batch_size` at a time, shortest first (less padding), in `layout` (see dpokit.data.batching; the plain layout
    where a model does not support it; `verify_layout` False skips asking the models, for a caller that has).
    `tools`: the tool schemas each prompt is offered (default: a ToolPrompt's own; see :func:`tokenize_responses`).
    """
    if not beta > 0:
        raise ConfigError(f"beta must be positive, got {beta}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    settings = settings or TokenizeConfig()
    examples, report, records = tokenize_responses(tokenizer, prompts, responses, settings, sources, tools)
    kept = sorted((i for i, e in enumerate(examples) if e is not None), key=lambda i: examples[i].length)
    policy, reference = _scorer(policy), _scorer(reference)
    modes = policy.model.training, reference.model.training  # the models' own: a fresh Scorer says training
    policy.eval()  # dropout off; a model being trained gets its mode back below
    reference.eval()
    try:
        pad = _pad(tokenizer)
        if kept and verify_layout:
            layout = supported_layout(policy, reference, [examples[i] for i in kept[-4:]], layout, pad,
                                      settings.max_length)
        logps = _score_batches(policy, reference, examples, kept, beta, batch_size, layout, pad, progress)
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    out = []
    reason = f"longer than max_length={settings.max_length} after prompt truncation"
    for i, example in enumerate(examples):
        if example is None:
            out.append(ImplicitReward(None, None, None, skipped=reason))
            continue
        reward, mine, ref = logps[i]
        out.append(ImplicitReward(reward, mine, ref, len(example.responses[0]),
                                  _truncated(example, records[i], tokenizer, settings)))
    return out


def ranking(rewards: Sequence[ImplicitReward]) -> list[int]:
    """Positions of `rewards` from the highest reward to the lowest (ties keep their input order); skipped ones
    last, in input order."""
    scored = [i for i, r in enumerate(rewards) if r.reward is not None]
    return sorted(scored, key=lambda i: -rewards[i].reward) + [i for i, r in enumerate(rewards) if r.reward is None]


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_settings(model: str, options: TokenizeOptions | None = None, *, log=print) -> TokenizeConfig:
    """Tokenisation settings for scoring with `model`, from `options` (default: TokenizeOptions' defaults; a
    ScoreConfig or EvalConfig is one), with dpokit eval's checks: a default max_length is lowered to the model's
    maximum positions and a default max_prompt_length to half of max_length (:class:`dpokit.config.Default`); a
    given value the model cannot take is a ConfigError."""
    from dpokit.models.loading import model_max_positions

    options = options or TokenizeOptions()
    check_options(options)
    options.check_lengths()
    max_length, max_prompt_length, note = options.fit_lengths(model_max_positions(model), model)
    if note:
        log(note)
    return TokenizeConfig(int(max_length), int(max_prompt_length), options.truncation, options.on_filtered,
                          options.apply_chat_template, options.on_long_rows)


def load_pair(model: str, ref_model: str, *, dtype: str = "float32", device: torch.device | str | None = None,
              attention: str = "auto") -> tuple[nn.Module, nn.Module, PreTrainedTokenizerBase]:
    """The policy, the reference (each a model directory, LoRA adapter directory or hub name, loaded in `dtype`
    on `device`, default :func:`default_device`, with the attention kernel `attention` chooses for the packed
    layout, as dpokit eval does: dpokit.models.attention) and the policy's tokenizer, which the reference must share."""
    from dpokit.models.attention import choose_attention, set_attention
    from dpokit.models.loading import load_model, load_tokenizer

    device = device or default_device()
    tokenizer = load_tokenizer(model)
    if load_tokenizer(ref_model).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"--ref-model {ref_model} has another vocabulary than --model {model}: the implicit reward "
                          "compares the two models' log-probs of the same tokens")
    policy = load_model(model, dtype=dtype).to(device)
    reference = load_model(ref_model, dtype=dtype).to(device)
    implementation = choose_attention(attention, device, "packed", training=False)
    for loaded in (policy, reference):
        set_attention(loaded, implementation)
    return policy, reference, tokenizer


class ImplicitJudge:
    """A judge (``list[str] -> list[float]``) whose score is the implicit reward of a DPO policy.

    Called with texts, it scores each whole text as the response to an empty prompt, the only reading of a text
    without its prompt. :meth:`continuations` scores continuations given their prompts, the reward DPO defines;
    dpokit.judges.pointwise.judge_continuations calls it for any judge that has it. A text too long to score (longer than
    the model's positions: responses are never cut) is a DataError rather than a made-up score.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, tokenizer: PreTrainedTokenizerBase, beta: float,
                 settings: TokenizeConfig, batch_size: int = 16, name: str = "implicit") -> None:
        if not beta > 0:
            raise ConfigError(f"implicit judge: beta must be positive, got {beta}")
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.beta, self.settings, self.batch_size = beta, settings, batch_size
        self.__name__ = name
        # asked once here rather than on every call: a judge is often called with a few texts at a time
        probe = [e for e in tokenize_responses(tokenizer, ["the", ""], [" a", " b c"], settings)[0] if e is not None]
        self.layout = (supported_layout(policy, reference, probe, "packed", _pad(tokenizer), settings.max_length)
                       if probe else "plain")

    def __call__(self, texts: list[str]) -> list[float]:
        """The implicit reward of each text as the response to an empty prompt."""
        return self.continuations([""] * len(texts), texts)

    def continuations(self, prompts: Sequence[Text], continuations: Sequence[Text]) -> list[float]:
        """The implicit reward of each continuation given its prompt (and the tools of a ToolPrompt, rendered by
        the chat template)."""
        scored = implicit_rewards(self.policy, self.reference, self.tokenizer, prompts, continuations, self.beta,
                                  settings=self.settings, batch_size=self.batch_size, layout=self.layout,
                                  verify_layout=False)
        for i, result in enumerate(scored):
            if result.reward is None:
                raise DataError(f"{self.__name__} judge: text {i}: {result.skipped}")
        return [r.reward for r in scored]


def implicit_judge(model: str, ref_model: str, beta: float = BETA, *, dtype: str = "float32",
                   device: torch.device | str | None = None, batch_size: int = 16) -> ImplicitJudge:
    """An :class:`ImplicitJudge` for the policy `model` against `ref_model` (directories or hub names): texts up
    to the model's maximum positions (512 tokens when its config does not say), prompts cut to half of that."""
    from dpokit.data.validation import check_model_spec
    from dpokit.models.loading import model_max_positions

    if not beta > 0:  # before any model is loaded
        raise ConfigError(f"implicit judge: beta must be positive, got {beta}")
    check_model_spec("implicit judge: policy", model)
    check_model_spec("implicit judge: reference", ref_model)
    policy, reference, tokenizer = load_pair(model, ref_model, dtype=dtype, device=device)
    positions = model_max_positions(model) or defaults_of(TokenizeOptions)["max_length"]
    lengths = TokenizeOptions(max_length=Default(positions), max_prompt_length=Default(positions // 2))
    settings = fit_settings(model, lengths, log=lambda *_: None)
    return ImplicitJudge(policy, reference, tokenizer, beta, settings, batch_size, name=f"implicit:{model}")
