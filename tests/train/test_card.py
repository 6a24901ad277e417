"""Model cards and the Hub: a run's final/ holds a README.md that huggingface_hub's ModelCard reads back (base model,
library, tags, loss, steps, metrics, versions, how to load it); a DoRA adapter run with --push-to-hub uploads that
directory at the end (the Hub's HfApi recorded, no network), and `dpokit eval` and `dpokit merge` take it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from dpokit.cli.main import main
from dpokit.config import TrainConfig
from dpokit.train.card import model_card

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's create_repo, create_branch and upload_folder, recorded instead of called (with the files the
    upload would send); a token is present and the Hub is online."""
    calls = []

    def record(name):
        def method(self, *args, **kwargs):
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                kwargs["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            calls.append((name, args, kwargs))
            return "https://huggingface.co/user/model/commit/0" if name == "upload_folder" else None
        return method

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_a_dora_run_saves_its_card_pushes_final_and_eval_and_merge_take_it(tiny_model_dir, sentiment_data, tmp_path,
                                                                          hub_calls, capsys):
    out = tmp_path / "dora"
    assert main(["dpo", "--model", tiny_model_dir, "--data", sentiment_data["train"], "--eval-data",
                 sentiment_data["eval"], "--output", str(out), "--lora-r", "4", "--use-dora", "--batch-size", "4",
                 "--max-steps", "2", "--lr", "1e-2", "--warmup-steps", "0", "--push-to-hub", "user/dora-model",
                 "--hub-private", "--hub-revision", "dev"]) == 0
    final = out / "final"
    assert json.loads((final / "adapter_config.json").read_text())["use_dora"] is True
    card = ModelCard.load(final / "README.md")
    eval_metrics = json.loads((final / "dpokit_metrics.json").read_text())
    assert card.data.library_name == "peft" and card.data.tags == ["dpo", "sigmoid", "dpokit", "lora"]
    record = card.data.dpokit
    assert record["base_model"] == tiny_model_dir and f"`{tiny_model_dir}`" in card.text
    assert record["metrics"]["eval"] == pytest.approx(eval_metrics) and record["metrics"]["train"]["loss"] > 0
    assert (record["steps"], record["examples"], record["training"]["use_dora"]) == (2, 8, True)
    assert record["loss"] == {"loss": "sigmoid", "beta": 0.1} and record["versions"]["torch"]
    assert "dpokit generate --model user/dora-model --prompt" in card.text and "AutoPeftModelForCausalLM" in card.text
    names = [name for name, _, _ in hub_calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hub_calls[0][1] == ("user/dora-model",) and hub_calls[0][2]["private"] is True
    upload = hub_calls[2][2]
    assert (upload["repo_id"], upload["revision"], Path(upload["folder_path"])) == ("user/dora-model", "dev", final)
    assert upload["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "dpokit_metrics.json",
                               "tokenizer.json", "tokenizer_config.json"]
    capsys.readouterr()
    assert main(["eval", "--model", str(final), "--ref-model", tiny_model_dir, "--data", sentiment_data["eval"],
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 60
    assert main(["merge", "--adapter", str(final), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_a_full_sft_model_card_names_its_hub_base_data_and_transformers():
    config = TrainConfig(model="HuggingFaceTB/SmolLM2-135M", data="trl-lib/ultrafeedback_binarized", output="runs/sft")
    card = model_card(config, "sft", steps=10, examples=80, train_metrics={"loss": 1.5, "lr": 1e-6, "step": 10},
                      eval_metrics={}, tokens=12345)
    again = ModelCard(str(card))
    assert again.data.base_model == "HuggingFaceTB/SmolLM2-135M" and again.data.library_name == "transformers"
    assert again.data.datasets == ["trl-lib/ultrafeedback_binarized"] and again.data.tags == ["sft", "dpokit"]
    assert again.data.dpokit["tokens"] == 12345 and again.data.dpokit["metrics"]["train"] == {"loss": 1.5}
    assert "AutoModelForCausalLM" in again.text and "12345 tokens" in again.text and "no held-out data" in again.text
    assert "dpokit generate --model runs/sft/final --prompt" in again.text
