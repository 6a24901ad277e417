"""dpokit.models.fused_lora: a LoRA layer as one autograd function gives peft's values and gradients, and only runs in
the plain case."""

import copy

import pytest
import torch
from helpers import make_llama
from peft import LoraConfig, get_peft_model
from torch import nn

import dpokit.models.fused_lora as fused_lora
from dpokit.data.batching import collate
from dpokit.models.fused_lora import fuse_lora_linears
from dpokit.models.gated_mlp import keep_less_in_gated_mlps
from dpokit.models.logprobs import sequence_logprobs
from dpokit.models.lora import LoraOptions, add_adapter
from dpokit.data.tokenize import TokenizedExample

pytestmark = pytest.mark.usefixtures("single_thread")


def _trained(model: nn.Module) -> nn.Module:
    for name, param in model.named_parameters():  # a trained adapter: B is not zero
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def _layer(alpha: float, bias: bool = False, dropout: float = 0.0):
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 40, bias=bias)

        def forward(self, x):
            return self.proj(x)

    config = LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    peft = _trained(get_peft_model(One(), config))
    fused = copy.deepcopy(peft)
    assert fuse_lora_linears(fused) == 1 and fuse_lora_linears(fused) == 0  # once per module
    return peft, fused


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def _calls(monkeypatch) -> list:
    calls = []
    real = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("alpha,bias", [(8, False), (8, True), (5, False)], ids=["scale2", "bias", "scale1.25"])
def test_values_and_gradients_match_peft(alpha, bias, monkeypatch):
    peft, fused = _layer(alpha, bias)
    calls = _calls(monkeypatch)
    x = torch.randn(3, 7, 24)
    out_a, x_grad_a, grads_a = _run(peft, x)
    assert not calls
    out_b, x_grad_b, grads_b = _run(fused, x)
    assert len(calls) == 1  # the fused function ran, not peft's forward
    torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_grad_b, x_grad_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and all("lora_" in n for n in grads_a)  # the base stays frozen
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-6)


def test_a_disabled_adapter_dropout_and_autocast_run_peft(monkeypatch):
    peft, fused = _layer(8, dropout=0.3)
    calls = _calls(monkeypatch)
    x = torch.randn(2, 5, 24)
    with fused.disable_adapter(), torch.no_grad():  # the LoRA reference: the base alone
        torch.testing.assert_close(fused(x), fused.get_base_model().proj.base_layer(x), rtol=0, atol=0)
    fused.train()
    fused(x)  # dropout in effect on the adapter's input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused.eval()
        fused(x)
    assert not calls
    fused.eval()  # dropout off: the fused path
    torch.testing.assert_close(fused(x), peft.eval()(x), rtol=1e-6, atol=1e-6)
    assert len(calls) == 1


def test_a_frozen_adapter_gets_no_gradient_and_the_input_still_does():
    peft, fused = _layer(8)
    for model in (peft, fused):
        model.requires_grad_(False)
    x = torch.randn(2, 5, 24)
    out_a, x_grad_a, _ = _run(peft, x)
    out_b, x_grad_b, grads = _run(fused, x)
    assert grads == {} and all(p.grad is None for p in fused.parameters())
    torch.testing.assert_close(x_grad_b, x_grad_a, rtol=1e-6, atol=1e-6)


def _shared_batch():
    """One seeded shared-layout batch of two pairs over a 64-token vocabulary."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: tuple(torch.randint(1, 64, (n,), generator=g).tolist())  # noqa: E731
    return collate([TokenizedExample(ids(9), (ids(5), ids(7))), TokenizedExample(ids(4), (ids(6), ids(3)))],
                   [0, 1], layout="shared", pad_token_id=0)


def _logps_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A model's sequence log-probs on `batch`, and its gradients of their sum."""
    model.zero_grad(set_to_none=True)
    logps = sequence_logprobs(model, batch)
    logps.sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["lean-mlp", "checkpointed"])
def test_log_probs_and_gradients_of_a_model_match_peft(checkpointing, monkeypatch):
    """Through a whole Llama, with the lean gated MLP (whose saved product the fused down_proj keeps as a view) or
    under gradient checkpointing (which runs the fused function again in the backward pass), in the shared layout:
    the numbers dpokit trains on."""
    peft = _trained(add_adapter(make_llama(vocab_size=64, hidden_size=48, num_hidden_layers=3), LoraOptions(4, 8)))
    if checkpointing:
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft.train()
    else:
        keep_less_in_gated_mlps(peft)
    fused = copy.deepcopy(peft)
    assert fuse_lora_linears(fused) == 3 * 7  # q, k, v, o, gate, up, down in each layer
    calls = _calls(monkeypatch)
    batch = _shared_batch()
    results = [_logps_and_grads(model, batch) for model in (peft, fused)]
    assert len(calls) == 3 * 7 * (2 if checkpointing else 1)  # checkpointing: once more in the backward pass
    (logps_a, grads_a), (logps_b, grads_b) = results
    torch.testing.assert_close(logps_b, logps_a, rtol=1e-6, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 3 * 7
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)


def test_zero3_partitions_and_quantized_bases_run_peft(monkeypatch):
    """A ZeRO-3 partition (its ``ds_id``) is gathered only when its own module is called, so its layer keeps peft's
    forward, which calls it; a 4-bit base is not an ``nn.Linear`` and is never changed."""
    peft, fused = _layer(8)
    calls = _calls(monkeypatch)
    layer = fused.get_base_model().proj
    layer.lora_A["default"].weight.ds_id = 7
    torch.testing.assert_close(fused(torch.ones(2, 24)), peft(torch.ones(2, 24)), rtol=0, atol=0)
    assert not calls
    del layer.lora_A["default"].weight.ds_id
    fused(torch.ones(2, 24))
    assert len(calls) == 1
    bnb = pytest.importorskip("bitsandbytes")
    quantized = peft.get_base_model()
    quantized.proj.base_layer = bnb.nn.Linear4bit(24, 40, bias=False)
    assert fuse_lora_linears(quantized) == 0


def test_dora_layers_run_peft_and_give_its_log_probs_and_gradients(monkeypatch):
    """A DoRA adapter (a magnitude per output feature beside the LoRA direction) is a peft variant the fused
    function does not compute: every layer hands it back to peft's forward, so the numbers are peft's exactly."""
    options = LoraOptions(4, 8, use_dora=True, use_rslora=True)
    peft = _trained(add_adapter(make_llama(vocab_size=64, hidden_size=48, num_hidden_layers=2), options))
    layer = peft.get_base_model().model.layers[0].self_attn.q_proj
    assert "default" in layer.lora_variant and "default" in layer.lora_magnitude_vector
    assert layer.scaling["default"] == 8 / 2  # rank-stabilised: α/√r
    for name, param in peft.named_parameters():  # a trained magnitude, not the base's own column norms
        if "lora_magnitude_vector" in name:
            param.data.mul_(torch.linspace(0.5, 1.5, param.shape[-1]))
    fused = copy.deepcopy(peft)
    assert fuse_lora_linears(fused) == 2 * 7
    calls = _calls(monkeypatch)
    batch = _shared_batch()
    results = [_logps_and_grads(model, batch) for model in (peft, fused)]
    assert not calls  # no DoRA layer went through the fused function
    (logps_a, grads_a), (logps_b, grads_b) = results
    torch.testing.assert_close(logps_b, logps_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 3 * 2 * 7  # A, B and the magnitude of each layer
    assert sum("lora_magnitude_vector" in n for n in grads_a) == 2 * 7
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0)
    with torch.no_grad():  # and peft's DoRA is really in effect: the adapter changes the numbers
        with fused.disable_adapter():
            base = sequence_logprobs(fused, batch)
        assert not torch.allclose(base, logps_a)
