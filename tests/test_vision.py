"""Vision-language DPO (docs/vision.md) on tiny VLMs built locally (tests/vlm_helpers.py: a LLaVA and a Qwen2-VL,
random init, processors built offline): `dpokit eval` equals TRL's `DPOTrainer.evaluate()` on the same models and
image pairs; image data in JSONL (paths) and Parquet (the Hub's {"bytes", "path"}) reads the same; bad image data
fails with one line naming the file, row and field; `dpokit dpo` trains each family, its vision tower unchanged.

Parity premises, as in tests/test_parity_trl.py: float32, no dropout, no truncation, a chat template whose turns end
in <|eot_id|> with nothing after it (so both libraries score the same tokens), an eval batch size dividing the pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from dpokit.cli.main import main  # noqa: E402
from dpokit.data.formats import load_preferences  # noqa: E402
from dpokit.data.vision import processor_of  # noqa: E402
from dpokit.models.loading import load_tokenizer  # noqa: E402
from helpers import make_llama, make_tokenizer  # noqa: E402
from vlm_helpers import COLOURS, make_llava, make_qwen2_vl, shape_image  # noqa: E402

TOL = 1e-4
N_PAIRS = 8
FAMILIES = {"llava": make_llava, "qwen2_vl": make_qwen2_vl}
METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
           "logps/chosen", "logps/rejected")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _rows(n: int) -> list[dict]:
    """Pairs about a coloured shape: one or two images per prompt (as content parts), one- or two-turn prompts."""
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        colour, other = colours[i % 4], colours[(i + 1) % 4]
        images = [f"shape{i}.png"] + ([f"shape{i}b.png"] if i % 3 == 0 else [])
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": "what colour is the shape"}]
        prompt = [{"role": "user", "content": parts}]
        if i % 2:
            prompt = [{"role": "system", "content": [{"type": "text", "text": "answer briefly"}]}] + prompt
        rows.append({"images": images, "prompt": prompt,  # every content as parts: Arrow (TRL's Dataset) mixes none
                     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"the shape is {colour}"}]}],
                     "rejected": [{"role": "assistant",
                                   "content": [{"type": "text", "text": f"it is {other} and round" * (1 + i % 2)}]}]})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vision")
    rows = _rows(N_PAIRS)
    for i, row in enumerate(rows):
        for j, name in enumerate(row["images"]):
            shape_image(list(COLOURS)[(i + j) % 4], "square" if (i + j) % 2 else "circle").save(root / name)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dirs = {f"{family}/{role}": make(root / family / role, seed=seed)
            for family, make in FAMILIES.items() for role, seed in (("policy", 1), ("reference", 2))}
    yield {"root": root, "rows": rows, "data": str(data), **dirs}
    torch.set_num_threads(threads)


def _trl_eval(setup, family: str) -> dict:
    from transformers import AutoModelForImageTextToText
    from trl import DPOConfig, DPOTrainer
    from PIL import Image

    from dpokit.models.vision import load_processor

    rows = [{**r, "images": [Image.open(setup["root"] / p).convert("RGB") for p in r["images"]]}
            for r in setup["rows"]]
    args = DPOConfig(output_dir=str(setup["root"] / f"trl-{family}"), per_device_eval_batch_size=4, beta=0.1,
                     max_length=None, use_cpu=True, bf16=False, fp16=False, disable_dropout=True, report_to=[],
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    load = lambda role: AutoModelForImageTextToText.from_pretrained(setup[f"{family}/{role}"],  # noqa: E731
                                                                     dtype=torch.float32).eval()
    dataset = Dataset.from_list(rows)
    trainer = DPOTrainer(model=load("policy"), ref_model=load("reference"), args=args, train_dataset=dataset,
                         eval_dataset=dataset, processing_class=load_processor(setup[f"{family}/policy"]))
    return {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_eval_on_image_pairs_matches_trl(setup, family, capsys):
    trl = _trl_eval(setup, family)
    capsys.readouterr()
    code = main(["eval", "--model", setup[f"{family}/policy"], "--ref-model", setup[f"{family}/reference"],
                 "--data", setup["data"], "--beta", "0.1", "--batch-size", "3", "--json"])
    assert code == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["examples"] == N_PAIRS
    report = {k: (ours[k], trl[k]) for k in METRICS}
    print(f"{family}: dpokit vs TRL {report}")
    bad = {k: v for k, v in report.items() if abs(v[0] - v[1]) >= TOL}
    assert not bad, f"{family}: dpokit vs TRL differ by >= {TOL} in {bad}"
    assert abs(trl["rewards/margins"]) > 0.05  # the models differ: the comparison is not vacuous


def test_parquet_with_image_bytes_reads_as_jsonl_with_paths(setup, tmp_path):
    """The Hub's datasets.Image feature as Parquet stores it ({"bytes", "path"}; content parts with null keys)."""
    rows = []
    for r in setup["rows"]:
        images = [{"bytes": (setup["root"] / p).read_bytes(), "path": None} for p in r["images"]]
        rows.append({**r, "images": images})
    parquet = tmp_path / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    from_jsonl, _ = load_preferences(setup["data"])
    from_parquet, _ = load_preferences(parquet)
    assert len(from_parquet) == N_PAIRS
    for a, b in zip(from_jsonl, from_parquet):
        assert a.prompt == b.prompt and a.chosen == b.chosen
        assert [i.tobytes() for i in a.images] == [i.tobytes() for i in b.images]


def _fails(args: list[str], capsys, *expected: str) -> None:
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    line = next((e for e in err if "error" in e.lower()), err[-1] if err else "")
    for part in expected:
        assert part in line, (part, err)


def test_bad_image_data_fails_before_training(setup, tmp_path, capsys):
    model = setup["llava/policy"]
    row = dict(setup["rows"][1])

    def data(name: str, **changes) -> str:
        (tmp_path / name).write_text(json.dumps(setup["rows"][0] | {"images": [str(setup["root"] / "shape0.png"),
                                                                               str(setup["root"] / "shape0b.png")]})
                                     + "\n" + json.dumps(row | changes) + "\n")
        return str(tmp_path / name)

    (tmp_path / "broken.png").write_bytes(b"not a png")
    eval_args = ["eval", "--model", model, "--ref-model", model, "--data"]
    _fails([*eval_args, data("missing.jsonl", images=["nowhere.png"])], capsys, "missing.jsonl:2", "images[0]",
           "nowhere.png", "not found")
    _fails([*eval_args, data("broken.jsonl", images=["broken.png"])], capsys, "broken.jsonl:2", "images[0]",
           "cannot read")
    _fails([*eval_args, data("count.jsonl", images=[str(setup["root"] / "shape1.png")] * 2)], capsys, "count.jsonl:2",
           "'images' holds 2 image(s)", "1 image placeholder")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": "no"})
                    + "\n")
    _fails([*eval_args, str(text)], capsys, "text.jsonl", "vision-language model", "no row has images")
    llama = tmp_path / "llama"
    tokenizer = make_tokenizer(chat_template="llama3")
    make_llama(vocab_size=len(tokenizer)).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    _fails(["eval", "--model", str(llama), "--ref-model", str(llama), "--data", setup["data"]], capsys,
           "pairs.jsonl:1", "'images'", "text-only model")


def _tower(directory, prefix: str) -> dict:
    weights = load_file(str(next(iter(sorted(__import__("pathlib").Path(directory).glob("*.safetensors"))))))
    return {k: v for k, v in weights.items() if prefix in k}


@pytest.mark.parametrize(("family", "tower", "lora"), [("llava", "vision_tower", False),
                                                      ("qwen2_vl", "visual", True)])
def test_dpo_trains_a_vlm_with_its_vision_tower_frozen(setup, family, tower, lora):
    out = setup["root"] / f"run-{family}"
    extra = ["--lora-r", "4"] if lora else []
    assert main(["dpo", "--model", setup[f"{family}/policy"], "--data", setup["data"], "--output", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-2", *extra]) == 0
    final = out / "final"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
    if lora:  # the adapter adapts the language model only
        adapter = load_file(str(final / "adapter_model.safetensors"))
        assert adapter and not any(tower in k for k in adapter), sorted(adapter)[:5]
        assert main(["eval", "--model", str(final), "--ref-model", setup[f"{family}/policy"], "--data",
                     setup["data"], "--json"]) == 0
        return
    before, after = _tower(setup[f"{family}/policy"], tower), _tower(final, tower)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen vision tower changed"
    text_before = _tower(setup[f"{family}/policy"], "language_model")
    text_after = _tower(final, "language_model")
    assert any(not torch.equal(text_before[k], text_after[k]) for k in text_before), "the language model did not train"
    assert processor_of(load_tokenizer(str(final))) is not None  # the processor is saved with the model


def test_train_vision_tower_trains_it(setup):
    out = setup["root"] / "run-llava-tower"
    assert main(["dpo", "--model", setup["llava/policy"], "--data", setup["data"], "--output", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-2", "--train-vision-tower"]) == 0
    before, after = _tower(setup["llava/policy"], "vision_tower"), _tower(out / "final", "vision_tower")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_string_prompts_get_their_image_placeholders_as_in_trl(setup, tmp_path):
    """A prompt of plain strings: one image part per image before the first user turn's text (TRL's
    prepare_multimodal_messages); the same pair as the content-part form."""
    row = {"images": [str(setup["root"] / "shape0.png")],
           "prompt": [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "what colour"}],
           "chosen": "red", "rejected": "blue"}
    (tmp_path / "strings.jsonl").write_text(json.dumps(row) + "\n")
    (pair,), _ = load_preferences(tmp_path / "strings.jsonl")
    assert pair.prompt == [{"role": "system", "content": "answer briefly"},
                           {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour"}]}]
    assert len(pair.images) == 1 and pair.images[0].mode == "RGB"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_samples_table_of_a_vlm_run_sees_the_images(setup, family, tmp_path, monkeypatch):
    """--log-samples on image pairs: the greedy samples are drawn with each prompt's images (without them a VLM's
    generate refuses image tokens with no image features), and the table reaches the tracker."""
    pytest.importorskip("mlflow")
    import mlflow

    from dpokit.data.vision import VisionExample
    from dpokit.train import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    seen = []
    real = tracking.greedy_samples
    monkeypatch.setattr(tracking, "greedy_samples", lambda model, tok, prompts, *a: seen.append(prompts) or
                        real(model, tok, prompts, *a))
    out = tmp_path / "run"
    assert main(["dpo", "--model", setup[f"{family}/policy"], "--data", setup["data"], "--eval-data", setup["data"],
                 "--output", str(out), "--max-steps", "1", "--batch-size", "2", "--report-to", "mlflow",
                 "--log-samples", "2", "--log-sample-tokens", "3", "--no-save-final"]) == 0
    assert len(seen) == 1 and len(seen[0]) == 2 and all(isinstance(e, VisionExample) and e.vision for e in seen[0])
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = mlflow.MlflowClient()
    tables = [f.path for f in client.list_artifacts(run.info.run_id, "samples")]
    assert tables == ["samples/step_000001.json"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, tables[0], str(tmp_path))).read_text())
    assert len(table["data"]) == 2 and all(row[2] is not None for row in table["data"])
