"""Clean refusals where images are not handled yet: `dpokit score`, `rank`, `winrate`, `reward`, `iterate` and
`demo` would otherwise tokenise an image model's prompts (or data with an ``images`` column) as text. Each refusal
is one line naming the flag and model, or the file and row, and saying which commands take images."""

from __future__ import annotations

from dpokit.data.images import SUPPORTED, refuse_images
from dpokit.errors import ConfigError


def refuse_vision_model(command: str, flag: str, spec: str | None, *, gguf_file: str | None = None) -> None:
    """A ConfigError when the model `spec` given as `flag` is a vision-language model (its config has a
    ``vision_config``), which `dpokit command` does not handle yet."""
    from dpokit.models.vision import is_vision_model

    if spec is not None and is_vision_model(spec, gguf_file=gguf_file):
        raise ConfigError(f"{flag} {spec}: a vision-language model, which dpokit {command} does not handle yet; "
                          f"{SUPPORTED}")


def refuse_image_data(command: str, spec: str | None, split: str = "train", column: str = "images") -> None:
    """A DataError naming the first row of the data set `spec` whose `column` holds images, which `dpokit
    command` does not handle yet (it would tokenise the prompt without them)."""
    from dpokit.data.sources import read_rows

    if spec is None:
        return
    for row, prov in read_rows(spec, split):
        refuse_images(row, prov, command, column)


def refuse_training_images(command: str, config) -> None:
    """The refusals of a training command that does not handle images yet (`dpokit reward`): its --model, then
    the rows of --data and --eval-data."""
    refuse_vision_model(command, "--model", config.model, gguf_file=getattr(config, "gguf_file", None))
    refuse_image_data(command, config.data, getattr(config, "split", "train"))
    refuse_image_data(command, getattr(config, "eval_data", None), getattr(config, "eval_split", "test"))
