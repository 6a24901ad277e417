"""The exactness check: log-probs, losses and gradients with every optimisation on against every optimisation off."""

from __future__ import annotations


def exactness(setup: dict, args) -> dict:
    """Log-probs, losses and gradients: every optimisation on (packed, chunked, forward groups) vs off (plain, full)."""
    import copy

    import torch
    from dpokit.api import load_model, load_tokenizer, prepare_data
    from dpokit.data.batching import collate, forward_groups
    from dpokit.config import TrainConfig
    from dpokit.models.logprobs import sequence_logprobs, token_logprobs
    from dpokit.losses.dispatch import LossConfig
    from dpokit.train.engine import Scorer
    from dpokit.losses.objective import DPOObjective
    from dpokit.train.reference import ModelReference

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(setup["model_dir"])
    cfg = TrainConfig(model=setup["model_dir"], data=setup["data"], output="-", max_length=args.max_length,
                      max_prompt_length=setup["max_prompt_length"])
    examples = prepare_data(cfg, "dpo", tokenizer, log=lambda *_: None).train[: args.batch_size]
    ids = list(range(len(examples)))
    reference_model = load_model(setup["model_dir"])
    policy = copy.deepcopy(reference_model)
    with torch.no_grad():  # move the policy away from the reference so that losses and gradients are generic
        gen = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * (p.std() if p.numel() > 1 else 1))
    policy.train()
    pad = tokenizer.pad_token_id
    out = {}
    for name, layout, chunked in (("on", "packed", True), ("off", "plain", False), ("shared", "shared", True)):
        batch = collate(examples, ids, layout=layout, pad_token_id=pad)
        policy.zero_grad(set_to_none=True)
        objective = DPOObjective(LossConfig(beta=0.1), ModelReference(reference_model, chunked=chunked))
        scorer = Scorer(policy, chunked=chunked)
        with torch.no_grad():
            tokens = token_logprobs(policy, batch, chunked=chunked)
            ref = sequence_logprobs(reference_model, batch, chunked=chunked)
        seqs = sequence_logprobs(policy, batch, chunked=chunked)
        result = objective(scorer, batch)
        (result.loss_sum / objective.divisor(batch)).backward()
        from dpokit.losses.dispatch import preference_loss

        with torch.no_grad():
            losses = preference_loss(seqs[0::2], seqs[1::2], ref[0::2], ref[1::2], LossConfig(beta=0.1)).losses
        loss = (result.loss_sum / objective.divisor(batch)).detach()
        if name == "on":  # the trainer's default path also splits the batch into forward groups (CPU)
            policy.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            for group in forward_groups(ids, examples, 1024):
                part = objective(scorer, collate([examples[i] for i in group], group, layout=layout,
                                                 pad_token_id=pad))
                (part.loss_sum / objective.divisor(batch)).backward()
                loss += (part.loss_sum / objective.divisor(batch)).detach()
        out[name] = {
            "target_ids": batch.target_ids, "token_logps": tokens, "policy_logps": seqs.detach(),
            "reference_logps": ref, "losses": losses, "loss": loss,
            "grads": {n: p.grad.detach().clone() for n, p in policy.named_parameters()},
        }

    def compare(a, b) -> dict:
        diff = (a - b).abs()
        scale = b.abs()
        return {"max_abs": diff.max().item(), "max_rel": (diff / scale.clamp_min(1e-30)).max().item(),
                "max_abs_over_max_value": (diff.max() / scale.max().clamp_min(1e-30)).item(),
                "allclose_1e-5": bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5)), "max_value": scale.max().item()}

    report = {}
    on, off = out["on"], out["off"]
    assert torch.equal(on["target_ids"], off["target_ids"]), "target order differs between layouts"
    for key in ("token_logps", "policy_logps", "reference_logps", "losses", "loss"):
        report[key] = compare(on[key].reshape(-1), off[key].reshape(-1))
    per_param = {n: compare(on["grads"][n], off["grads"][n]) for n in on["grads"]}
    flat_on = torch.cat([g.reshape(-1) for g in on["grads"].values()])
    flat_off = torch.cat([g.reshape(-1) for g in off["grads"].values()])
    report["grads_all_params"] = compare(flat_on, flat_off)
    report["grads_worst_param_by_rel_to_max"] = max(per_param.items(), key=lambda kv: kv[1]["max_abs_over_max_value"])
    report["grads_all_params_allclose_1e-5"] = all(v["allclose_1e-5"] for v in per_param.values())
    report["shared_vs_off_policy_logps"] = compare(out["shared"]["policy_logps"], off["policy_logps"])
    report["batch"] = {"pairs": len(examples), "scored_tokens": int(on["target_ids"].numel())}
    report["pass"] = all(report[k]["allclose_1e-5"] for k in ("token_logps", "policy_logps", "reference_logps",
                                                               "losses", "loss", "grads_all_params"))
    return report
