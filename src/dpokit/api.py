"""The Python API, a facade: the public functions and where they live. The CLI is a thin face over the same.

>>> from dpokit import TrainConfig, train_dpo
>>> train_dpo(TrainConfig(model="sft-model", data="pairs.jsonl", output="runs/dpo", beta=0.1))

Training runs are wired in dpokit.train.run, their data prepared in dpokit.train.prepare, evaluation in
dpokit.eval.evaluate, sampling in dpokit.eval.generation, merging in dpokit.train.policy.
"""

from __future__ import annotations

from dpokit.config.eval import EvalConfig, GenerateConfig, MergeConfig
from dpokit.eval.evaluate import evaluate
from dpokit.eval.generation import Sample, generate, sample, sample_ids
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.train.policy import merge
from dpokit.train.prepare import PreparedData, prepare_data
from dpokit.train.run import make_accelerator, train_dpo, train_objective, train_sft

__all__ = ["EvalConfig", "GenerateConfig", "MergeConfig", "PreparedData", "Sample", "evaluate", "generate",
           "load_model", "load_tokenizer", "make_accelerator", "merge", "prepare_data", "sample", "sample_ids",
           "train_dpo", "train_objective", "train_sft"]
