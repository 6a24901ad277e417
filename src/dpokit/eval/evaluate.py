"""`dpokit eval` and :func:`dpokit.evaluate`: the preference loss, reward accuracy, margins and log-probs of a
policy against a reference on a data set, without training."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpokit.config.eval import EvalConfig
from dpokit.data.validation import check_eval_inputs
from dpokit.losses.objective import DPOObjective, KTOObjective
from dpokit.models.attention import choose_attention, set_attention
from dpokit.models.loading import load_model, load_tokenizer
from dpokit.models.logprobs import check_layout
from dpokit.runtime.threads import apply_threads, model_width
from dpokit.train.engine import Scorer
from dpokit.train.loop import evaluate as evaluate_objective
from dpokit.train.prepare import prepare_data
from dpokit.train.reference import ModelReference
from dpokit.train.run import fit_lengths, make_accelerator


def evaluate(config: EvalConfig, log: Callable[[str], None] = print) -> dict[str, float]:
    """Preference loss, reward accuracy, margins and log-probs of ``config.model`` against ``config.ref_model``
    on ``config.data``; nothing is trained.

    Without a reference model (``reference_free``, or a reference-free loss) the evaluation is reference-free.
    With ``loss="kto"`` the data is unpaired (prompt, completion, label) and the metrics are KTO's
    (dpokit.losses.objective.KTOObjective). The default ``max_length`` is lowered to the model's maximum
    positions when it has fewer; ``threads`` sets torch's CPU threads (default: dpokit.runtime.threads chooses);
    ``attention`` is as TrainConfig.attention (``flex`` runs on CPU too here: evaluation needs no backward pass).
    `log` receives the progress lines. Returns the metrics and ``examples``, the number evaluated.
    """
    check_eval_inputs(config)
    loss_config = config.loss_config()
    accelerator = make_accelerator(config)
    tokenizer = load_tokenizer(config.model, gguf_file=config.gguf_file)
    # the lengths fitted to the model, applied to a copy: `config` stays as given
    run_config = _train_view(fit_lengths(config, log).applied(config))
    data = prepare_data(run_config, "kto" if loss_config.unpaired else "dpo", tokenizer, log)
    examples = data.train
    policy = Scorer(load_model(config.model, dtype=config.dtype, gguf_file=config.gguf_file).to(accelerator.device))
    apply_threads(config.threads, width=model_width(policy.model), device=accelerator.device, log=log)
    attention = choose_attention(config.attention, accelerator.device, config.layout, training=False)
    set_attention(policy.model, attention)
    reference = None
    if not config.reference_free:  # simpo and orpo set it
        reference_model = load_model(config.ref_model, dtype=config.dtype).to(accelerator.device)
        set_attention(reference_model, attention)
        reference = ModelReference(reference_model)
    # the layout both models give the plain layout's numbers in (the plain one where a model's attention or
    # positions rule it out, as Qwen2-VL's do with images), as training settles it
    for scorer in (policy,) if reference is None else (policy, reference.model):
        run_config.layout = check_layout(scorer, examples[-4:], run_config.layout, tokenizer.pad_token_id,
                                         device=accelerator.device, max_length=run_config.max_length)
    objective = KTOObjective(loss_config, reference, torch.tensor(data.train_labels)) if loss_config.unpaired \
        else DPOObjective(loss_config, reference, average_logps=config.average_logps)
    metrics = evaluate_objective(policy, objective, examples, run_config, accelerator,
                                 tokenizer.pad_token_id)
    metrics["examples"] = len(examples)
    return metrics


def _train_view(config: EvalConfig):
    """The evaluation's options as the TrainConfig that prepare_data and the loop's evaluate read (its columns,
    split and cache options keep their defaults: `dpokit eval` has no flags for them). Private: the public
    entry point takes an EvalConfig."""
    from dpokit.config import TrainConfig
    from dpokit.config.data import TokenizeOptions
    from dpokit.config.loss import LossOptions
    from dpokit.config.options import options_of

    shared = {f.name: getattr(config, f.name) for piece in (LossOptions, TokenizeOptions) for f in options_of(piece)}
    return TrainConfig(model=config.model, data=config.data, output="-", format=config.format,
                       batch_size=config.batch_size, layout=config.layout, attention=config.attention,
                       dtype=config.dtype, gguf_file=config.gguf_file, **shared)
