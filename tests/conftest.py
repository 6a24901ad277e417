import pytest

from helpers import make_tokenizer


@pytest.fixture(scope="session", autouse=True)
def _private_stores(tmp_path_factory):
    """Tokenised-data cache entries of the tests go to a temporary directory, never the user's ~/.cache, and so do
    the offline archives of a Comet experiment started without a directory of its own (by default Comet writes them
    into the working directory, the checkout); the variables are inherited by the subprocesses that tests launch."""
    import os

    names = {"DPOKIT_CACHE": "dpokit-cache", "COMET_OFFLINE_DIRECTORY": "comet-offline"}
    previous = {name: os.environ.get(name) for name in names}
    for name, folder in names.items():
        os.environ[name] = str(tmp_path_factory.mktemp(folder))
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_tokenizer(chat_template=True)


# --- training-core fixtures (tests/train/test_loop.py, train/test_checkpoint.py, cli/test_main.py, test_end_to_end.py) ---

POSITIVE = "great good wonderful fun loved enjoyed liked".split()
NEGATIVE = "awful bad boring dull hated slow".split()
NEUTRAL = "the film movie plot actor acting music score scene story".split()


def write_sentiment_pairs(path, n: int, seed: int) -> str:
    """A synthetic preference set: neutral prompts; chosen from positive words, rejected from negative ones.

    Response lengths vary (2-5 words), so micro-batches hold different token counts.
    """
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            prompt = " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(2, 5)))
            chosen = " " + " ".join(rng.choice(POSITIVE) for _ in range(rng.randint(2, 5)))
            rejected = " " + " ".join(rng.choice(NEGATIVE) for _ in range(rng.randint(2, 5)))
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A random tiny Llama (hidden 32, 2 layers) saved with the test tokenizer, as a model directory."""
    from helpers import make_llama

    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory):
    """Paths of a 200-pair training set and a disjointly seeded 60-pair evaluation set."""
    root = tmp_path_factory.mktemp("sentiment")
    return {"train": write_sentiment_pairs(root / "train.jsonl", 200, seed=0),
            "eval": write_sentiment_pairs(root / "eval.jsonl", 60, seed=1)}


@pytest.fixture
def single_thread():
    """One intra-op thread for tiny models: with the CPU cores shared, OpenMP threads spin against each other
    and make 32-wide matmuls ~50x slower. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
