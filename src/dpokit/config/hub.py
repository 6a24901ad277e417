"""The options that publish a trained model on the Hugging Face Hub: `--push-to-hub` at the end of `dpokit dpo` and
`dpokit sft` (HubOptions, a piece of TrainConfig), and `dpokit push` (PushConfig).

Whether a push can work is checked before anything is trained or loaded (:func:`check_hub_access`): the repository
id's form, offline mode and a token, with huggingface_hub's own validator and token lookup. Nothing here calls the
network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dpokit.config.options import check_options, opt, positional, same_as
from dpokit.errors import ConfigError


@dataclass
class HubOptions:
    """Publishing the run's final model (with its model card) on the Hub."""

    push_to_hub: str | None = opt(None, "at the end of the run, upload OUTPUT/final (model or adapter, with its "
                                  "model card README.md) to this Hub repository, e.g. user/my-dpo-model (created "
                                  "if missing; needs a token: `hf auth login` or HF_TOKEN)", metavar="REPO_ID")
    hub_private: bool = opt(False, "create the --push-to-hub repository as private (an existing one keeps its "
                            "visibility)")
    hub_revision: str | None = opt(None, "branch of the --push-to-hub repository to upload to (created from the "
                                   "default branch if missing; default: main)")

    def check_hub(self) -> None:
        """Refuse a --push-to-hub that cannot work (:func:`check_hub_access`), before anything is loaded."""
        if self.push_to_hub is None:
            for name in ("hub_private", "hub_revision"):
                if getattr(self, name) not in (None, False):
                    raise ConfigError(f"--{name.replace('_', '-')} applies with --push-to-hub")
            return
        if not getattr(self, "save_final", True):
            raise ConfigError("--push-to-hub uploads OUTPUT/final, which --no-save-final leaves out")
        check_hub_access(self.push_to_hub, revision=self.hub_revision)


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def check_hub_access(repo_id: str | None, flag: str = "--push-to-hub", revision: str | None = None) -> None:
    """Refuse, in one line and without calling the network, a push that cannot work: a malformed repository id,
    Hub offline mode (HF_HUB_OFFLINE), or no token (`hf auth login` or HF_TOKEN). Nothing when `repo_id` is None."""
    if repo_id is None:
        return
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:  # a model repository is always NAMESPACE/NAME when it is pushed to
            raise HFValidationError("it must be NAMESPACE/NAME, e.g. user/my-dpo-model")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"{flag} {repo_id!r}: not a valid Hub repository id: {reason}") from None
    if revision is not None and (not revision.strip() or revision.startswith(("/", ".")) or ".." in revision):
        raise ConfigError(f"--hub-revision {revision!r}: not a valid branch name")
    if _offline():
        raise ConfigError(f"{flag} {repo_id}: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set); "
                          "unset it to upload, or leave out the push")
    if not get_token():
        raise ConfigError(f"{flag} {repo_id}: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN "
                          "(a token with write access)")


@dataclass
class PushConfig:
    """Everything `dpokit push` takes."""

    directory: str = positional(opt(None, "a finished run's output directory (its final/ is pushed) or a model or "
                                    "adapter directory itself", required=True, metavar="DIR"))
    repo_id: str = positional(opt(None, "Hub repository to upload to, e.g. user/my-dpo-model (created if missing)",
                                  required=True, metavar="REPO_ID"))
    hub_private: bool = same_as(HubOptions, "hub_private", help="create the repository as private (an existing one "
                                                                "keeps its visibility)")
    hub_revision: str | None = same_as(HubOptions, "hub_revision", help="branch to upload to (created from the "
                                                                        "default branch if missing; default: main)")

    def __post_init__(self) -> None:
        check_options(self)
