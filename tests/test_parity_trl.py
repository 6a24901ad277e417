"""Peer parity: `dpokit eval` agrees with TRL's `DPOTrainer.evaluate()` on the same policy, reference and data.

TRL is a test-only dependency (the `test` extra): without it this module is skipped.

The comparison is made apples-to-apples, following TRL 1.16's own code (trl/trainer/dpo_trainer.py):

* **Tokenisation.** TRL tokenises ``prompt + response + eos_token`` jointly and slices off the longest common
  prefix with the tokenised prompt; dpokit tokenises prompt and response separately (docs/conventions.md). The
  two agree exactly when the boundary is clean, so the data here has prompts that end in a word and responses
  that start with a space, and ``test_data_tokenises_identically`` asserts that TRL's and dpokit's token ids
  (EOS included) are the same, pair by pair.
* **No truncation.** ``max_length=None`` in TRL; dpokit's defaults (512 tokens) are far above these lengths and
  nothing is filtered (``examples`` is checked).
* **Float32, no dropout.** ``bf16=False`` (TRL would otherwise default to bf16), both models float32 and in eval
  mode.
* **Averaging.** TRL's ``eval_loss`` is a per-example weighted mean, but its other ``eval_*`` metrics are means
  of per-batch means; dpokit reports global means over all pairs. With an eval batch size that divides the number
  of pairs the two coincide, so TRL runs with ``per_device_eval_batch_size=8`` on 24 pairs, while dpokit runs with
  batch sizes that do not divide 24 (5 and 7), which its global mean does not care about.
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("trl")
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402  (a dependency of dpokit and TRL)
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dpokit.api import EvalConfig, evaluate  # noqa: E402
from dpokit.cli.main import main  # noqa: E402
from dpokit.data.records import PreferencePair  # noqa: E402
from dpokit.data.tokenize import TokenizeConfig, tokenize_examples  # noqa: E402
from helpers import WORDS, make_llama, make_tokenizer  # noqa: E402

TOL = 1e-4
N_PAIRS = 24
TRL_EVAL_BATCH = 8  # divides N_PAIRS: TRL's mean of per-batch means is then the global mean
METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
           "logps/chosen", "logps/rejected")
# Loss types whose definitions are identical in TRL 1.16 and dpokit (dpokit/losses.py; TRL `_compute_loss`):
#   sigmoid  -logsigmoid(beta*h)                                  (label_smoothing 0: TRL's sigmoid ignores it)
#   hinge    relu(1 - beta*h)
#   ipo      (h_avg - 1/(2*beta))**2, log-ratios divided by each response's token count (EOS included) in both
#   robust   (-(1-eps)*logsigmoid(beta*h) + eps*logsigmoid(-beta*h)) / (1-2*eps)
# and a sample of the further losses (every one is compared with TRL's loss code in tests/losses/test_losses_trl.py):
# sigmoid_norm (length-averaged like ipo), exo_pair, bco_pair, apo_down.
LOSSES = [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1), ("sigmoid_norm", 0.0),
          ("exo_pair", 1e-3), ("bco_pair", 0.0), ("apo_down", 0.0)]

# TRL's DPOConfig defaults `gradient_checkpointing=True`, which transformers 5 reports as deprecated; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """Prompts ending in a word, responses starting with a space: a clean token boundary for byte-level BPE."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in ("Human", "Assistant")]
    rows = []
    while len(rows) < n:
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        chosen = " " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        rejected = " " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        if chosen != rejected:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama policy and a different tiny Llama reference (other seed), saved with the test tokenizer,
    and a JSONL file of standard-format preference pairs."""
    # One intra-op thread: these models are tiny, and on a shared 2-core machine extra threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("parity")
    tokenizer = make_tokenizer()
    dirs = {}
    # initializer_range 0.3 (not the default 0.02) makes the two random models differ enough to give rewards of
    # order 0.1-1 rather than ~0.01, so a wrong sign or a swapped model would move the loss far beyond TOL.
    for name, seed in (("policy", 1), ("reference", 2)):
        dirs[name] = str(root / name)
        make_llama(seed=seed, initializer_range=0.3).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    rows = _pairs(N_PAIRS)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    yield {"tokenizer": tokenizer, "rows": rows, "data": str(data), "root": root, **dirs}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trl_run(setup):
    """TRL's DPOTrainer.evaluate() for a (loss, label_smoothing), cached per module: (metrics, trainer)."""
    cache: dict = {}

    def run(loss: str, label_smoothing: float = 0.0, weights: tuple[float, ...] | None = None,
            ld_alpha: float | None = None, use_weighting: bool = False):
        """`loss` may name several losses, comma-separated, weighted by `weights` (TRL's loss_weights)."""
        key = (loss, label_smoothing, weights, ld_alpha, use_weighting)
        if key not in cache:
            policy = AutoModelForCausalLM.from_pretrained(setup["policy"], dtype="float32")
            reference = AutoModelForCausalLM.from_pretrained(setup["reference"], dtype="float32")
            args = DPOConfig(
                output_dir=str(setup["root"] / f"trl-{loss}"), per_device_eval_batch_size=TRL_EVAL_BATCH,
                beta=0.1, loss_type=loss.split(","), loss_weights=weights and list(weights),
                label_smoothing=label_smoothing, ld_alpha=ld_alpha, use_weighting=use_weighting, max_length=None,
                use_cpu=True, bf16=False, fp16=False, disable_dropout=True,
                report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
            )
            dataset = Dataset.from_list(setup["rows"])
            trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                                 eval_dataset=dataset, processing_class=setup["tokenizer"])
            metrics = trainer.evaluate()
            cache[key] = ({k.removeprefix("eval_"): v for k, v in metrics.items()}, trainer)
        return cache[key]

    return run


def _assert_close(dpokit: dict, trl: dict, what: str) -> None:
    missing = [k for k in METRICS if k not in trl or k not in dpokit]
    assert not missing, f"metrics missing ({what}): {missing}; TRL has {sorted(trl)}, dpokit {sorted(dpokit)}"
    report = {k: (dpokit[k], trl[k]) for k in METRICS}
    bad = {k: v for k, v in report.items() if abs(v[0] - v[1]) >= TOL}
    assert not bad, f"{what}: dpokit vs TRL differ by >= {TOL} in {bad} (all: {report})"


def test_data_tokenises_identically(setup, trl_run):
    """The premise of the parity test: on this data TRL's joint-tokenise-and-slice gives the same token ids as
    dpokit's separate tokenisation, EOS included, so both score exactly the same tokens."""
    tokenizer, rows = setup["tokenizer"], setup["rows"]
    for row in rows:  # the clean-boundary property itself
        for response in (row["chosen"], row["rejected"]):
            joint = tokenizer(row["prompt"] + response)["input_ids"]
            separate = tokenizer(row["prompt"])["input_ids"]
            separate += tokenizer(response, add_special_tokens=False)["input_ids"]
            assert joint == separate, (row["prompt"], response)
    _, trainer = trl_run("sigmoid")
    records = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"row {i}") for i, r in enumerate(rows)]
    examples, report = tokenize_examples(records, tokenizer, TokenizeConfig())
    assert report.kept == N_PAIRS and not report.filtered and not report.prompts_truncated
    trl_rows = list(trainer.eval_dataset)
    assert len(trl_rows) == N_PAIRS
    for ours, theirs in zip(examples, trl_rows):
        assert list(ours.prompt_ids) == theirs["prompt_ids"]
        assert list(ours.responses[0]) == theirs["chosen_ids"]
        assert list(ours.responses[1]) == theirs["rejected_ids"]
        assert ours.responses[0][-1] == ours.responses[1][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(("loss", "label_smoothing"), LOSSES)
def test_api_evaluate_matches_trl(setup, trl_run, loss, label_smoothing):
    trl, _ = trl_run(loss, label_smoothing)
    ours = evaluate(EvalConfig(model=setup["policy"], data=setup["data"], ref_model=setup["reference"], beta=0.1,
                               loss=loss, label_smoothing=label_smoothing, batch_size=7), log=lambda *_: None)
    assert ours["examples"] == N_PAIRS
    _assert_close(ours, trl, f"dpokit.api.evaluate, loss={loss}")
    # a sanity check that the comparison is not vacuous: the models differ, and not every pair is won or lost
    assert abs(trl["rewards/margins"]) > 0.05 and 0 < trl["rewards/accuracies"] < 1


def test_a_mixture_of_losses_matches_trl(setup, trl_run):
    trl, _ = trl_run("sigmoid,bco_pair", 0.0, (0.8, 0.2))
    ours = evaluate(EvalConfig(model=setup["policy"], data=setup["data"], ref_model=setup["reference"], beta=0.1,
                               loss="sigmoid,bco_pair",
                               loss_weights="0.8,0.2", batch_size=7), log=lambda *_: None)
    _assert_close(ours, trl, "dpokit.api.evaluate, loss=sigmoid,bco_pair (0.8, 0.2)")
    single, _ = trl_run("sigmoid")
    assert abs(trl["loss"] - single["loss"]) > 0.05  # the second loss and its weight count


@pytest.mark.parametrize("layout", ["packed", "plain"])
def test_length_desensitised_dpo_matches_trl(setup, trl_run, layout):
    """LD-DPO (`--ld-alpha`, TRL's `ld_alpha`): the token weights reach policy and reference in every layout."""
    trl, _ = trl_run("sigmoid", 0.0, None, 0.3)
    ours = evaluate(EvalConfig(model=setup["policy"], data=setup["data"], ref_model=setup["reference"], beta=0.1,
                               ld_alpha=0.3, layout=layout, batch_size=7), log=lambda *_: None)
    _assert_close(ours, trl, f"dpokit.api.evaluate, ld_alpha=0.3, layout={layout}")
    plain, _ = trl_run("sigmoid")
    assert abs(trl["logps/chosen"] - plain["logps/chosen"]) > 1.0  # the weights change the log-probs


@pytest.mark.parametrize("loss", ["sigmoid", "ipo,bco_pair"])
def test_wpo_weighting_matches_trl(setup, trl_run, loss):
    """WPO (`--use-weighting`, TRL's `use_weighting`): each pair's loss times the policy's weights of its responses."""
    trl, _ = trl_run(loss, 0.0, None, None, True)
    ours = evaluate(EvalConfig(model=setup["policy"], data=setup["data"], ref_model=setup["reference"], beta=0.1,
                               loss=loss, use_weighting=True, batch_size=7), log=lambda *_: None)
    _assert_close(ours, trl, f"dpokit.api.evaluate, use_weighting, loss={loss}")
    assert ours["loss"] == pytest.approx(trl["loss"], rel=1e-3)  # the weighted losses are small: relative too
    unweighted, _ = trl_run(loss)
    assert abs(trl["loss"] - unweighted["loss"]) > 1e-3 and trl["loss"] > 0  # the weights change the loss


def test_cli_eval_json_matches_trl(setup, trl_run, capsys):
    trl, _ = trl_run("sigmoid")
    capsys.readouterr()
    code = main(["eval", "--model", setup["policy"], "--ref-model", setup["reference"], "--data", setup["data"],
                 "--loss", "sigmoid", "--beta", "0.1", "--batch-size", "5", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    ours = json.loads(out)  # --json promises one JSON object and nothing else on stdout
    assert ours["examples"] == N_PAIRS
    _assert_close(ours, trl, "dpokit eval --json")


def test_boundary_convention_differs(setup, trl_run):
    """The documented difference (docs/conventions.md): a prompt ending in a space. dpokit keeps the prompt's
    trailing-space token and scores the response as tokenised alone; TRL merges the space into the response's
    first token and drops it from the prompt."""
    tokenizer = setup["tokenizer"]
    row = {"prompt": "the film was ", "chosen": "great", "rejected": "boring"}
    (example,), _ = tokenize_examples([PreferencePair(**row)], tokenizer, TokenizeConfig())
    _, trainer = trl_run("sigmoid")
    theirs = next(iter(trainer._prepare_dataset(Dataset.from_list([row]), tokenizer, trainer.args, "boundary")))
    eos = tokenizer.eos_token_id
    assert list(example.prompt_ids) == tokenizer("the film was ")["input_ids"]
    assert list(example.responses[0]) == tokenizer("great", add_special_tokens=False)["input_ids"] + [eos]
    assert theirs["prompt_ids"] == tokenizer("the film was")["input_ids"]  # the trailing space is gone
    assert theirs["chosen_ids"] == tokenizer(" great", add_special_tokens=False)["input_ids"] + [eos]
    assert list(example.prompt_ids) != theirs["prompt_ids"]
    assert list(example.responses[0]) != theirs["chosen_ids"]


def test_chat_template_convention_differs(trl_run, chat_tokenizer):
    """The other documented difference: with a chat template whose turns end in ``<|im_end|>\\n``, TRL scores
    the trailing newline after the end-of-turn token; dpokit scores the response up to and including
    ``<|im_end|>`` (the token generation stops at) and, as that is a special token, appends no EOS."""
    row = {"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "great"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    (example,), _ = tokenize_examples([PreferencePair(**row)], chat_tokenizer, TokenizeConfig())
    _, trainer = trl_run("sigmoid")
    theirs = next(iter(trainer._prepare_dataset(Dataset.from_list([row]), chat_tokenizer, trainer.args, "chat")))
    assert list(example.prompt_ids) == theirs["prompt_ids"]
    assert chat_tokenizer.decode(example.responses[0]) == "great<|im_end|>"
    assert chat_tokenizer.decode(theirs["chosen_ids"]) == "great<|im_end|>\n"
    assert theirs["chosen_ids"] == list(example.responses[0]) + chat_tokenizer("\n")["input_ids"]


# --- multi-turn conversational data -------------------------------------------------------------------------------

def _conversations(n: int, seed: int = 3) -> list[dict]:
    """Multi-turn rows: system, user, assistant, user prompts (some shorter); responses of one or two assistant
    messages."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in ("Human", "Assistant")]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    def response() -> list[dict]:
        return [{"role": "assistant", "content": text(1, 8)} for _ in range(rng.choice((1, 1, 2)))]

    rows = []
    while len(rows) < n:
        prompt = [{"role": "system", "content": text(2, 5)}] if rng.random() < 0.7 else []
        prompt += [{"role": "user", "content": text(2, 8)}]
        if rng.random() < 0.7:
            prompt += [{"role": "assistant", "content": text(1, 6)}, {"role": "user", "content": text(2, 8)}]
        chosen, rejected = response(), response()
        if chosen != rejected:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def multi_turn(setup):
    """The parity setup again with a Llama-3-style tokenizer (turns end in <|eot_id|>, nothing after it, so both
    libraries score the same tokens) and multi-turn conversational pairs; TRL's evaluate() on them."""
    root = setup["root"] / "multi"
    tokenizer = make_tokenizer(chat_template="llama3")
    dirs = {}
    for name, seed in (("policy", 1), ("reference", 2)):
        dirs[name] = str(root / name)
        make_llama(vocab_size=len(tokenizer), seed=seed, initializer_range=0.3).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    rows = _conversations(N_PAIRS)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = DPOConfig(output_dir=str(root / "trl"), per_device_eval_batch_size=TRL_EVAL_BATCH, beta=0.1,
                     max_length=None, use_cpu=True, bf16=False, fp16=False, disable_dropout=True, report_to=[],
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    dataset = Dataset.from_list(rows)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(dirs["policy"], dtype="float32"),
                         ref_model=AutoModelForCausalLM.from_pretrained(dirs["reference"], dtype="float32"),
                         args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
    return {"tokenizer": tokenizer, "rows": rows, "data": str(data), "trainer": trainer, "trl": metrics, **dirs}


def test_multi_turn_data_tokenises_identically_and_eval_matches_trl(multi_turn):
    tokenizer, rows = multi_turn["tokenizer"], multi_turn["rows"]
    records = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"row {i}") for i, r in enumerate(rows)]
    examples, report = tokenize_examples(records, tokenizer, TokenizeConfig())
    assert report.kept == N_PAIRS and not report.prompts_truncated
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for ours, theirs in zip(examples, multi_turn["trainer"].eval_dataset):
        assert list(ours.prompt_ids) == theirs["prompt_ids"]
        assert [list(r) for r in ours.responses] == [theirs["chosen_ids"], theirs["rejected_ids"]]
        assert ours.responses[0][-1] == ours.responses[1][-1] == eot
    assert any(len(r["prompt"]) == 4 for r in rows) and any(len(r["chosen"]) == 2 for r in rows)
    ours = evaluate(EvalConfig(model=multi_turn["policy"], data=multi_turn["data"],
                               ref_model=multi_turn["reference"], beta=0.1, batch_size=7), log=lambda *_: None)
    assert ours["examples"] == N_PAIRS
    _assert_close(ours, multi_turn["trl"], "multi-turn conversational data")
    assert abs(multi_turn["trl"]["rewards/margins"]) > 0.05 and 0 < multi_turn["trl"]["rewards/accuracies"] < 1


def test_multi_turn_chatml_differs_only_by_the_newline_trl_scores(multi_turn, chat_tokenizer):
    """With ChatML the one difference is the documented one, turn by turn: TRL also scores the "\\n" after the
    final <|im_end|>; the prompts and everything before that newline are the same ids."""
    rows = multi_turn["rows"][:6]
    records = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"row {i}") for i, r in enumerate(rows)]
    examples, _ = tokenize_examples(records, chat_tokenizer, TokenizeConfig())
    trainer = multi_turn["trainer"]
    theirs = list(trainer._prepare_dataset(Dataset.from_list(rows), chat_tokenizer, trainer.args, "chatml"))
    newline = chat_tokenizer("\n")["input_ids"]
    for ours, trl_row in zip(examples, theirs):
        assert list(ours.prompt_ids) == trl_row["prompt_ids"]
        assert trl_row["chosen_ids"] == list(ours.responses[0]) + newline
        assert trl_row["rejected_ids"] == list(ours.responses[1]) + newline
