"""What a run derived from its options, kept apart from them: the options stay as the user gave them (and as
run_config.yaml records them), the derived values beside them in its ``resolved:`` section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Resolved:
    """The values a run settled on: the lengths fitted to the model's maximum positions (dpokit.config.data
    TokenizeOptions.fit_lengths) and the batch layout the model supports (dpokit.models.logprobs.check_layout)."""

    max_length: int
    max_prompt_length: int
    layout: str

    @classmethod
    def of(cls, config: Any) -> Resolved:
        """Nothing derived yet: the options' own values."""
        return cls(config.max_length, config.max_prompt_length, config.layout)

    def applied(self, config: Any) -> Any:
        """A copy of `config` with these values, for the code that reads them from a config (the loop, the
        tokeniser); `config` itself is not changed."""
        return dataclasses.replace(config, **dataclasses.asdict(self))

    def as_dict(self) -> dict[str, Any]:
        """The values as plain JSON/YAML types."""
        return {k: v if isinstance(v, str) else int(v) for k, v in dataclasses.asdict(self).items()}
