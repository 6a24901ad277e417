"""One loader for every judge spec the commands take: pointwise (``vader``, ``module:function``,
``classifier:PATH:LABEL``, ``reward:PATH``, ``implicit:POLICY:REF[:BETA]``) and pairwise (``llm:PATH``, or any
pointwise spec made pairwise)."""

from __future__ import annotations

import importlib

from dpokit.errors import ConfigError
from dpokit.judges.pairwise import DEFAULT_TEMPLATE, PairwiseJudge, from_pointwise
from dpokit.judges.pointwise import Judge, classifier_judge, function_judge, reward_judge, vader_judge


def _implicit_judge(spec: str) -> Judge:
    """``implicit:POLICY:REF[:BETA]`` (β 0.1 by default; model paths without colons)."""
    parts = spec[len("implicit:"):].split(":")
    beta = 0.1
    if len(parts) == 3:
        try:
            beta = float(parts[2])
        except ValueError:
            raise ConfigError(f"bad judge spec {spec!r}: BETA {parts[2]!r} is not a number") from None
        parts = parts[:2]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"bad judge spec {spec!r}: expected 'implicit:POLICY_DIR:REF_DIR' or "
                          "'implicit:POLICY_DIR:REF_DIR:BETA'")
    from dpokit.eval.scoring import implicit_judge

    return implicit_judge(parts[0], parts[1], beta)


def load_judge(spec: str) -> Judge:
    """Build a judge from a spec string.

    * ``"vader"`` - :func:`vader_judge`;
    * ``"classifier:PATH:LABEL"`` - :func:`classifier_judge` (the label is the text after the last colon);
    * ``"reward:PATH"`` - :func:`reward_judge` (the raw score of a one-output reward model);
    * ``"implicit:POLICY_DIR:REF_DIR"`` or ``"implicit:POLICY_DIR:REF_DIR:BETA"`` - the implicit reward of the DPO
      policy against its reference, β 0.1 by default (dpokit.eval.scoring.implicit_judge; see
      :func:`judge_continuations` for scoring a continuation given its prompt);
    * ``"package.module:function"`` - an importable Python callable ``str -> float`` (:func:`function_judge`).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("judge spec is empty: use 'vader', 'module.path:function', 'classifier:PATH:LABEL', "
                          "'reward:PATH' or 'implicit:POLICY_DIR:REF_DIR[:BETA]'")
    spec = spec.strip()
    if spec.lower() == "vader":
        return vader_judge()
    if spec.startswith("classifier:"):
        rest = spec[len("classifier:"):]
        path, sep, label = rest.rpartition(":")
        if not sep or not path or not label:
            raise ConfigError(f"bad judge spec {spec!r}: expected 'classifier:PATH:LABEL'")
        return classifier_judge(path, label)
    if spec.startswith("reward:"):
        if not spec[len("reward:"):]:
            raise ConfigError(f"bad judge spec {spec!r}: expected 'reward:PATH'")
        return reward_judge(spec[len("reward:"):])
    if spec.startswith("implicit:"):
        return _implicit_judge(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"bad judge spec {spec!r}: use 'vader', 'module.path:function', 'classifier:PATH:LABEL', 'reward:PATH' "
            "or 'implicit:POLICY_DIR:REF_DIR[:BETA]'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"judge spec {spec!r}: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"judge spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"judge spec {spec!r}: {attr!r} is not callable")
    return function_judge(obj)


def load_pairwise_judge(spec: str, *, template: str | None = None, both_orders: bool = True,
                        batch_size: int = 8, device: str | None = None) -> PairwiseJudge:
    """A pairwise judge from a spec: ``llm:PATH`` (an LLM judge asked with `template`, default
    :data:`DEFAULT_TEMPLATE`; `both_orders` asks it with the responses in both orders), or any spec of
    :func:`dpokit.judges.loader.load_judge`, made pairwise with :func:`from_pointwise`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("--judge is empty: use llm:PATH, or a pointwise judge (vader, module:function, "
                          "classifier:PATH:LABEL, reward:PATH, implicit:POLICY:REF)")
    spec = spec.strip()
    if spec.startswith("llm:"):
        path = spec[len("llm:"):]
        if not path:
            raise ConfigError(f"bad judge spec {spec!r}: expected 'llm:PATH'")
        from dpokit.data.validation import check_model_spec

        check_model_spec("--judge llm:", path)  # a mistyped path is named at once, never looked up on the Hub
        from dpokit.judges.llm import llm_judge

        return llm_judge(path, template=template or DEFAULT_TEMPLATE, both_orders=both_orders,
                         batch_size=batch_size, device=device)
    if template is not None:
        raise ConfigError("--judge-template is for an llm:PATH judge; a pointwise judge has no prompt")
    from dpokit.judges.loader import load_judge

    return from_pointwise(load_judge(spec))
