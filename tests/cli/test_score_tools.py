"""`dpokit score` and `dpokit rank` on rows with a `tools` column: the tools are rendered with the conversation by
the chat template exactly as training tokenises them (a row's reward is the one `dpokit eval` computes for it), rank
orders the candidates by the reward with the tools rendered, a reward model reads the same rendering, and a bad
tools value is a one-line error naming the file, the row and the field."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from dpokit.api import EvalConfig, evaluate
from dpokit.cli.main import main
from helpers import make_llama, make_tokenizer
from helpers import TOOL_CALL as CALL, TOOL_CLOCK as CLOCK, TOOL_PROMPT as PROMPT, TOOL_WEATHER as WEATHER

pytestmark = pytest.mark.usefixtures("single_thread")

# with the tools rendered these rank 0, 2, 3, 1 under the fixture's models, without them 1, 2, 3, 0
CANDIDATES = ["the weather is good", "I never saw it", "maybe", "sure"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Directories of a policy, its reference and a reward model (tiny, random), all with a tokenizer whose chat
    template renders tools."""
    root = tmp_path_factory.mktemp("tools-models")
    tokenizer = make_tokenizer(chat_template="tools")
    for name, seed in (("policy", 0), ("reference", 1)):
        make_llama(vocab_size=len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    return {name: str(root / name) for name in ("policy", "reference", "reward")} | {"tokenizer": tokenizer}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run(command: str, dirs, data: str, capsys, *options: str) -> list[dict]:
    """`dpokit COMMAND` on `data` with the fixture's policy and reference, its output rows."""
    capsys.readouterr()
    assert main([command, "--model", dirs["policy"], "--ref-model", dirs["reference"], "--data", data,
                 "--output", "-", *options]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@torch.no_grad()
def by_hand(models, tokenizer, response: str, tools) -> list[float]:
    """The summed log-prob of the response turn under each of `models`, or each one's score when it is a reward
    model, over the conversation rendered with `tools` by the chat template directly."""
    extra = {"tools": tools} if tools else {}
    head = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True, **extra)
    full = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": response}], tokenize=False,
                                         **extra).rstrip()
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    out = []
    for model in models:
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        if logits.dim() == 1:  # a reward model: its one output, pooled at the last token
            out.append(float(logits[0]))
            continue
        logps = torch.log_softmax(logits, -1)
        out.append(float(sum(logps[t - 1, ids[t]] for t in range(start, len(ids)))))
    return out


def test_score_of_a_tools_row_is_the_implicit_reward_eval_computes(dirs, tmp_path, capsys):
    chosen = [{"role": "assistant", "content": "", "tool_calls": [CALL]}]
    pair = {"prompt": PROMPT, "tools": [WEATHER, CLOCK], "chosen": chosen, "rejected": "it is sunny"}
    report = evaluate(EvalConfig(model=dirs["policy"], data=write_jsonl(tmp_path / "pair.jsonl", [pair]),
                                 ref_model=dirs["reference"], beta=0.1), log=lambda *_: None)
    rows = [{"prompt": PROMPT, "tools": [WEATHER, CLOCK], "response": chosen},
            {"prompt": PROMPT, "tools": json.dumps([WEATHER, CLOCK]), "response": "it is sunny"},  # as Parquet/CSV
            {"prompt": PROMPT, "response": "it is sunny"}]  # no tools
    out = run("score", dirs, write_jsonl(tmp_path / "r.jsonl", rows), capsys, "--beta", "0.1")
    assert out[0]["reward"] == pytest.approx(report["rewards/chosen"], abs=1e-6)
    assert out[1]["reward"] == pytest.approx(report["rewards/rejected"], abs=1e-6)
    assert out[0]["logp_policy"] == pytest.approx(report["logps/chosen"], abs=1e-5)
    assert out[1]["logp_policy"] == pytest.approx(report["logps/rejected"], abs=1e-5)
    assert abs(out[2]["reward"] - out[1]["reward"]) > 1e-3  # the tools are part of what is scored
    assert out[0]["tools"] == out[1]["tools"] == [WEATHER, CLOCK] and "tools" not in out[2]  # written back


def test_rank_orders_the_candidates_by_the_reward_with_the_tools_rendered(dirs, tmp_path, capsys):
    from dpokit.models.loading import load_model

    rows = [{"prompt": PROMPT, "tools": [WEATHER, CLOCK], "responses": CANDIDATES},
            {"prompt": PROMPT, "responses": CANDIDATES}]
    with_tools, without = run("rank", dirs, write_jsonl(tmp_path / "c.jsonl", rows), capsys, "--beta", "0.1")
    models = [load_model(dirs["policy"]), load_model(dirs["reference"])]
    for row, tools in ((with_tools, [WEATHER, CLOCK]), (without, None)):
        expected = [0.1 * (p - r) for p, r in (by_hand(models, dirs["tokenizer"], c, tools) for c in CANDIDATES)]
        order = sorted(range(len(CANDIDATES)), key=lambda j: -expected[j])
        assert [entry["response_index"] for entry in row["ranking"]] == order
        assert [entry["reward"] for entry in row["ranking"]] == pytest.approx([expected[j] for j in order], abs=5e-5)
        assert row["best"] == CANDIDATES[order[0]] and row["best_index"] == order[0]
    # the tools change the order, so an order computed without them would fail the check above
    assert [e["response_index"] for e in with_tools["ranking"]] != [e["response_index"] for e in without["ranking"]]
    assert with_tools["tools"] == [WEATHER, CLOCK] and "tools" not in without


def test_a_reward_models_score_renders_the_rows_tools(dirs, tmp_path, capsys):
    from dpokit.models.loading import load_reward_model

    rows = [{"prompt": PROMPT, "tools": [CLOCK], "response": "it is sunny"},
            {"prompt": PROMPT, "response": "it is sunny"}]
    capsys.readouterr()
    assert main(["score", "--model", dirs["reward"], "--data", write_jsonl(tmp_path / "r.jsonl", rows),
                 "--output", "-"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = load_reward_model(dirs["reward"], dirs["tokenizer"].pad_token_id)
    for row, tools in zip(out, ([CLOCK], None)):
        assert row["reward"] == pytest.approx(by_hand([model], dirs["tokenizer"], "it is sunny", tools)[0], abs=1e-5)
    assert abs(out[0]["reward"] - out[1]["reward"]) > 1e-4


@pytest.mark.parametrize("command", ["score", "rank"])
@pytest.mark.parametrize("tools, message", [
    ({"name": "get_time"}, "r.jsonl:2: field 'tools' must be a list of tool schemas (objects with a 'name'), got dict"),
    ([CLOCK, 3], "r.jsonl:2: field 'tools[1]' must be a tool schema, an object with a 'name'"),
    ("[not json", "r.jsonl:2: field 'tools' is not valid JSON"),
])
def test_a_bad_tools_value_is_a_one_line_error_naming_the_row_and_field(command, tools, message, dirs, tmp_path,
                                                                         capsys):
    key, value = ("response", "yes") if command == "score" else ("responses", ["yes", "no"])
    good = {"prompt": PROMPT, "tools": [CLOCK], key: value}
    data = write_jsonl(tmp_path / "r.jsonl", [good, {**good, "tools": tools}])
    assert main([command, "--model", dirs["policy"], "--ref-model", dirs["reference"], "--data", data,
                 "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out.jsonl").exists()


def test_tools_on_a_plain_text_prompt_need_the_chat_template(dirs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "the weather in Paris", "tools": [CLOCK],
                                               "response": " sunny"}])
    args = ["score", "--model", dirs["policy"], "--ref-model", dirs["reference"], "--data", data, "--output", "-"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "r.jsonl:1: field 'tools' needs a conversational prompt" in err, err
    (row,) = run("score", dirs, data, capsys, "--apply-chat-template")  # the prompt as a user turn, with its tools
    (plain,) = run("score", dirs, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the weather in Paris",
                                                                       "response": " sunny"}]),
                   capsys, "--apply-chat-template")
    assert row["reward"] is not None and abs(row["reward"] - plain["reward"]) > 1e-4
