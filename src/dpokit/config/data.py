"""The options that say what data is read and how it becomes tokens."""

from __future__ import annotations

from dataclasses import dataclass

from dpokit.config.options import Default, FRACTION, POSITIVE, opt
from dpokit.errors import ConfigError


@dataclass
class DataOptions:
    """Where the training data comes from and how its rows are read."""

    data: str = opt(None, "training data: .jsonl/.json/.parquet/.csv file, save_to_disk directory, or hub name", required=True)
    eval_data: str | None = opt(None, "held-out evaluation data (same formats as --data)")
    eval_fraction: float = opt(0.0, "hold out this fraction of --data for evaluation when --eval-data is not given", range=FRACTION)
    split: str = opt("train", "split to read from a dataset directory or hub dataset")
    eval_split: str = opt("test", "split to read from --eval-data when it is a dataset directory or hub dataset")
    format: str = opt("auto", "data format", choices=("auto", "standard", "conversational", "implicit", "ranked", "completion",
                                                      "unpaired"))
    prompt_column: str = opt("prompt", "name of the prompt column")
    chosen_column: str = opt("chosen", "name of the chosen-response column")
    rejected_column: str = opt("rejected", "name of the rejected-response column")
    completion_column: str = opt("completion", "name of the completion column (SFT prompt/completion data)")
    responses_column: str = opt("responses", "name of the responses column (ranked data)")
    scores_column: str = opt("scores", "name of the scores column (ranked data)")
    data_cache: bool = opt(True, "cache the tokenised data on disk, keyed by the raw data, tokenizer and settings: "
                           "a later run with the same inputs skips loading and tokenising")
    data_cache_dir: str | None = opt(None, "where tokenised data is cached (default: $DPOKIT_CACHE or "
                                     "~/.cache/dpokit/tokenized)")
    streaming: bool = opt(False, "data larger than memory: read rows one at a time (Hub data sets streamed), "
                          "tokenise them chunk by chunk into shards on disk and train from the memory-mapped "
                          "shards; same examples, order and resume as without it. With --eval-fraction the "
                          "data is read twice (to count it, then to tokenise it)")


@dataclass
class TokenizeOptions:
    """How a row becomes tokens: lengths, truncation, chat template, what to do with what does not fit."""

    max_length: int = opt(Default(512), "maximum prompt + response tokens; the default is lowered to the model's "
                          "maximum positions when it has fewer (a larger value given is an error)", range=POSITIVE)
    max_prompt_length: int = opt(Default(256), "prompt length the prompt is cut to when prompt + response is too "
                                 "long; the default is lowered to half of --max-length when that is smaller", range=POSITIVE)
    truncation: str = opt("keep_end", "which end of a too-long prompt to keep", choices=("keep_end", "keep_start"), aliases=("--truncation-mode",))
    on_filtered: str = opt("skip", "what to do with identical or too-long pairs: skip them (counted) or fail", choices=("skip", "error"))
    apply_chat_template: bool = opt(False, "render plain-text (standard-format) data with the tokenizer's chat "
                                    "template: each prompt as a user turn, each response as the assistant turn, "
                                    "tokenised exactly like conversational data")
    on_long_rows: str = opt("cut", "a text longer than --max-length tokens could ever need (more characters than "
                            "max-length times the tokenizer's longest token): cut it to that before tokenising, "
                            "counted and named in the filtering report (the tokens kept are the same), or fail "
                            "naming its row; bounds the memory a huge row takes", choices=("cut", "error"))

    def is_default(self, name: str) -> bool:
        """Whether option `name` holds its default because nobody gave it (see :class:`Default`)."""
        return isinstance(getattr(self, name), Default)

    def check_lengths(self) -> None:
        """--max-prompt-length below --max-length: a given one must be, the default is lowered to half of it."""
        if self.max_prompt_length >= self.max_length and not self.is_default("max_prompt_length"):
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be less than --max-length "
                              f"({self.max_length}): a too-long example keeps its prompt cut to this length")
        if self.is_default("max_prompt_length") and self.max_prompt_length >= self.max_length:
            self.max_prompt_length = Default(self.max_length // 2)

    def fit_lengths(self, positions: int | None, model: str) -> tuple[int, int, str | None]:
        """The (max_length, max_prompt_length) a model with `positions` maximum positions takes, and a note when
        they are not the options' (None otherwise). A default is lowered; a larger value the user gave is an
        error. The options themselves are left as given: a run keeps what it derived apart (dpokit.train.run)."""
        max_length, max_prompt_length = self.max_length, self.max_prompt_length
        if positions is None or max_length <= positions:
            return max_length, max_prompt_length, None
        if not self.is_default("max_length"):
            raise ConfigError(f"--max-length {max_length} is more than the {positions} positions of {model} "
                              f"(max_position_embeddings); give at most {positions}")
        note = f"note: --max-length {positions}, not the default {int(max_length)}: {model} has {positions} positions"
        if max_prompt_length >= positions:
            if not self.is_default("max_prompt_length"):
                raise ConfigError(f"--max-prompt-length {max_prompt_length} must be less than the {positions} "
                                  f"positions of {model}")
            max_prompt_length = Default(positions // 2)
            note += f"; --max-prompt-length {max_prompt_length}"
        return positions, max_prompt_length, note
