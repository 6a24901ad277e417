"""Uploading a final model directory (model or adapter, tokenizer, model card) to the Hugging Face Hub with
huggingface_hub's HfApi: the end of a run with ``--push-to-hub`` and `dpokit push`. Whether a push can work (the
repository id, offline mode, a token) is checked before a run starts: dpokit.config.hub.check_hub_access."""

from __future__ import annotations

from pathlib import Path

from dpokit.errors import ConfigError, TrainingError

FINAL = "final"
# files of a final directory that are not uploaded: a half-written temporary one
IGNORE = ["*.tmp", "*.tmp/*", ".*"]


def model_dir(directory: str | Path) -> Path:
    """The directory `dpokit push DIR` uploads: DIR/final for a run's output directory, else DIR itself when it
    holds a model or an adapter."""
    directory = Path(directory)
    for candidate in (directory / FINAL, directory):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            return candidate
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory")
    raise ConfigError(f"{directory}: neither a finished run (no {FINAL}/ holding a model) nor a model or adapter "
                      "directory (no config.json or adapter_config.json)")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                message: str | None = None) -> str:
    """Upload everything in `folder` to the model repository `repo_id` (created if missing, as private when
    `private`; on branch `revision`, created if missing) in one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 commit_message=message or f"dpokit: upload {folder.name}", ignore_patterns=IGNORE)
    except Exception as error:  # HTTP, connection, permission: the run's model stays saved either way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingError(f"pushing {folder} to the Hub repository {repo_id} failed: {reason}") from None
    return str(getattr(info, "commit_url", info))
