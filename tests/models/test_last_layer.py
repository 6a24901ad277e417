"""dpokit.models.last_layer: the last decoder layer's output projection and MLP run only at the read positions, with the
log-probs and gradients of running them everywhere, and only where that is exact."""

import pytest
import torch

import dpokit.models.last_layer as last_layer
from dpokit.data.batching import collate
from dpokit.models.gated_mlp import keep_less_in_gated_mlps
from dpokit.models.last_layer import last_layer_only_at, per_token_modules
from dpokit.models.logprobs import sequence_logprobs
from dpokit.models.lora import LoraOptions, add_adapter
from dpokit.data.tokenize import TokenizedExample
from helpers import make_gpt2, make_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def _examples() -> list[TokenizedExample]:  # lengths differ: padding in every layout
    return [TokenizedExample(tuple(range(5 + i, 14 + 3 * i)), (tuple(range(20, 24 + 2 * i)), tuple(range(40, 42 + i))))
            for i in range(5)]


def _logps_and_grads(model, batch, *, restricted: bool, monkeypatch):
    if not restricted:
        monkeypatch.setattr(last_layer, "per_token_modules", lambda model: [])
    model.zero_grad()
    logps = sequence_logprobs(model, batch)
    (logps * torch.linspace(-1, 1, logps.numel())).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    monkeypatch.undo()
    return logps.detach(), grads


@pytest.mark.parametrize("layout", ["plain", "shared", "packed"])
@pytest.mark.parametrize("variant", ["full", "lean-mlp", "lora"])
def test_restricting_the_last_layer_keeps_logprobs_and_gradients(layout, variant, monkeypatch):
    model = make_llama(num_hidden_layers=3)
    if variant == "lean-mlp":
        assert keep_less_in_gated_mlps(model) == 3
    if variant == "lora":
        model = add_adapter(model, LoraOptions(r=4, alpha=8))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained adapter, so that its gradients are not trivially those of B = 0
                torch.nn.init.normal_(p, std=0.1)
    assert len(per_token_modules(model)) == 2
    batch = collate(_examples(), list(range(5)), layout=layout, pad_token_id=0)
    on = _logps_and_grads(model, batch, restricted=True, monkeypatch=monkeypatch)
    off = _logps_and_grads(model, batch, restricted=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(on[0], off[0], rtol=0, atol=1e-5)
    assert on[1].keys() == off[1].keys() and on[1]
    for name in off[1]:
        torch.testing.assert_close(on[1][name], off[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_mlp_sees_only_the_read_positions_and_the_hooks_go_away():
    model = make_llama()
    batch = collate(_examples(), list(range(5)), layout="packed", pad_token_id=0)
    seen = []
    mlp = model.model.layers[-1].mlp
    probe = mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        sequence_logprobs(model, batch)
    probe.remove()
    assert seen == [len(torch.unique(batch.target_index))]
    assert seen[0] < batch.input_ids.numel()
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks
    assert not model.model.layers[-1].self_attn.o_proj._forward_pre_hooks


def test_other_inputs_pass_through_unchanged():
    model = make_llama()
    x = torch.randn(2, 7, 32)
    expected = model.model.layers[-1].mlp(x)
    with last_layer_only_at(model, 3, 5, torch.tensor([0, 4, 9])):
        assert torch.equal(model.model.layers[-1].mlp(x), expected)  # not [3, 5, ...]: left alone


def test_not_applied_under_gradient_checkpointing_or_to_other_architectures():
    model = make_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert per_token_modules(model) == []
    assert per_token_modules(make_gpt2()) == []
