"""Images beyond dpo and eval (docs/vision.md): the commands that do not handle them yet refuse a vision-language
model or data with images in one line naming the flag or the file and row; `dpokit generate` samples from a VLM
with --image and with images in --prompts objects, seeded, and a text model given --image is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.cli.main import main
from helpers import make_llama, make_tokenizer
from vlm_helpers import COLOURS, make_llava, shape_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vision_commands")
    for colour in COLOURS:
        shape_image(colour).save(root / f"{colour}.png")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"images": [f"{c}.png"], "prompt": [{"role": "user", "content": "colour?"}],
                                         "chosen": [{"role": "assistant", "content": c}],
                                         "rejected": [{"role": "assistant", "content": "none"}]}) + "\n"
                             for c in COLOURS))
    llama = root / "llama"
    tokenizer = make_tokenizer(chat_template="llama3")
    make_llama(vocab_size=len(tokenizer)).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    yield {"root": root, "pairs": str(pairs), "vlm": make_llava(root / "llava", seed=1), "llama": str(llama)}
    torch.set_num_threads(threads)


def _error_line(args: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(args) != 0
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_score_refuses_a_vlm_and_rows_with_images(setup, tmp_path, capsys):
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"prompt": "hi", "response": "yes"}) + "\n"
                         + json.dumps({"images": ["red.png"], "prompt": "colour?", "response": "red"}) + "\n")
    line = _error_line(["score", "--model", setup["vlm"], "--ref-model", setup["vlm"], "--data", str(responses),
                        "--output", "-"], capsys)
    assert "--model" in line and "vision-language model" in line and "dpokit score" in line and "dpokit dpo" in line
    line = _error_line(["score", "--model", setup["llama"], "--ref-model", setup["llama"], "--data",
                        str(responses), "--output", "-"], capsys)
    assert "responses.jsonl:2" in line and "'images'" in line and "dpokit score" in line and "dpokit eval" in line
    line = _error_line(["rank", "--model", setup["llama"], "--ref-model", setup["vlm"], "--data", str(responses),
                        "--output", "-"], capsys)
    assert "--ref-model" in line and "dpokit rank" in line


def test_reward_refuses_a_vlm_and_pairs_with_images(setup, tmp_path, capsys):
    line = _error_line(["reward", "--model", setup["vlm"], "--data", setup["pairs"], "--output",
                        str(tmp_path / "r")], capsys)
    assert "--model" in line and "vision-language model" in line and "dpokit reward" in line
    line = _error_line(["reward", "--model", setup["llama"], "--data", setup["pairs"], "--output",
                        str(tmp_path / "r")], capsys)
    assert "pairs.jsonl:1" in line and "'images'" in line and "dpokit reward" in line
    assert not (tmp_path / "r").exists()


def test_winrate_iterate_and_demo_refuse_images(setup, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("hi") + "\n" + json.dumps({"prompt": "colour?", "images": ["red.png"]}) + "\n")
    line = _error_line(["winrate", "--model", setup["vlm"], "--baseline", setup["llama"], "--prompts", str(prompts),
                        "--judge", "vader"], capsys)
    assert "--model" in line and "dpokit winrate" in line
    line = _error_line(["winrate", "--model", setup["llama"], "--baseline", setup["llama"], "--prompts",
                        str(prompts), "--judge", "vader"], capsys)
    assert "prompts.jsonl:2" in line and "'images'" in line and "dpokit winrate" in line
    line = _error_line(["iterate", "--model", setup["llama"], "--prompts", str(prompts), "--output",
                        str(tmp_path / "it")], capsys)
    assert "prompts.jsonl:2" in line and "dpokit iterate" in line
    line = _error_line(["demo", "--model", setup["vlm"], "--output", str(tmp_path / "demo")], capsys)
    assert "--model" in line and "dpokit demo" in line


def _generate(args: list[str], capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["generate", *args, "--max-new-tokens", "6"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_generate_samples_from_a_vlm_with_images_seeded(setup, capsys, monkeypatch):
    monkeypatch.chdir(setup["root"])
    args = ["--model", setup["vlm"], "--prompt", "what colour is the square?", "--image", "red.png",
            "--num-samples", "2", "--seed", "3"]
    first = _generate(args, capsys)
    assert _generate(args, capsys) == first  # the same seed, the same samples
    assert len(first) == 2 and first[0]["images"] == ["red.png"]
    assert first[0]["prompt"][0]["content"][0] == {"type": "image"}
    assert all(isinstance(s["completion"], str) and s["completion"] for s in first)
    assert _generate([*args[:-1], "4"], capsys) != first  # another seed, other samples (random tiny model)
    prompts = setup["root"] / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "colour?", "images": ["blue.png"]}) + "\n"
                       + json.dumps({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                              {"type": "text", "text": "same?"}]}],
                                     "images": ["red.png", "green.png"]}) + "\n" + json.dumps("no image") + "\n")
    rows = _generate(["--model", setup["vlm"], "--prompts", str(prompts), "--temperature", "0"], capsys)
    assert [r.get("images") for r in rows] == [["blue.png"], ["red.png", "green.png"], None]
    assert rows == _generate(["--model", setup["vlm"], "--prompts", str(prompts), "--temperature", "0"], capsys)


def test_generate_refuses_images_for_a_text_model_in_one_line(setup, capsys, monkeypatch):
    monkeypatch.chdir(setup["root"])
    line = _error_line(["generate", "--model", setup["llama"], "--prompt", "colour?", "--image", "red.png"], capsys)
    assert "prompt 1 has images" in line and "text-only model" in line
    line = _error_line(["generate", "--model", setup["vlm"], "--prompt", "colour?", "--image", "nowhere.png"],
                       capsys)
    assert "nowhere.png" in line and "not found" in line


def test_sft_trains_a_vlm_on_completions_with_images(setup, tmp_path, capsys):
    from dpokit.data.formats import load_completions
    from dpokit.data.tokenize import TokenizeConfig
    from dpokit.data.vision import VisionExample, tokenize_vision_examples
    from dpokit.models.loading import load_tokenizer

    data = setup["root"] / "sft.jsonl"
    data.write_text("".join(json.dumps({"images": [f"{c}.png"], "prompt": [{"role": "user", "content": "colour?"}],
                                        "completion": [{"role": "assistant", "content": c}]}) + "\n"
                            for c in COLOURS))
    records, _ = load_completions(data)
    assert [len(r.images) for r in records] == [1] * 4 and records[0].prompt[0]["content"][0] == {"type": "image"}
    examples, _ = tokenize_vision_examples(records, load_tokenizer(setup["vlm"]), TokenizeConfig(max_length=128, max_prompt_length=64))
    assert all(isinstance(e, VisionExample) and len(e.responses) == 1 and "pixel_values" in e.vision
               for e in examples)
    capsys.readouterr()
    assert main(["sft", "--model", setup["vlm"], "--data", str(data), "--output", str(tmp_path / "sft"),
                 "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0"]) == 0
    assert (tmp_path / "sft" / "final" / "processor_config.json").exists()
    kto = setup["root"] / "kto.jsonl"
    kto.write_text(json.dumps({"images": ["red.png"], "prompt": "colour?", "completion": "red", "label": True}) + "\n")
    line = _error_line(["dpo", "--model", setup["vlm"], "--data", str(kto), "--loss", "kto", "--output",
                        str(tmp_path / "kto")], capsys)
    assert "kto.jsonl:1" in line and "not in unpaired (KTO) data" in line
