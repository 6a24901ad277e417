"""dpokit.models.gated_mlp: a gated MLP keeps only gate and up for the backward pass, with bit-identical numbers."""

import copy

import pytest
import torch
from helpers import make_gpt2, make_llama

from dpokit.models.gated_mlp import keep_less_in_gated_mlps
from dpokit.models.lora import LoraOptions, add_adapter

pytestmark = pytest.mark.usefixtures("single_thread")
INTERMEDIATE = 80  # the MLP width: unlike any other dimension of the model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.log_softmax(logits.float(), -1)[..., 0].mean() + logits.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _pair(lora: bool):
    plain = make_llama(vocab_size=64, hidden_size=48, intermediate_size=INTERMEDIATE, num_hidden_layers=3)
    if lora:
        plain = add_adapter(plain, LoraOptions(r=4, alpha=8))
        for name, param in plain.named_parameters():  # a trained adapter: B is not zero
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    lean = copy.deepcopy(plain)
    assert keep_less_in_gated_mlps(lean) == 3 and keep_less_in_gated_mlps(lean) == 0  # once per module
    return plain, lean


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_values_and_gradients_are_bit_identical(lora):
    plain, lean = _pair(lora)
    ids = torch.randint(1, 64, (3, 17))
    loss_a, grads_a = _loss_and_grads(plain, ids)
    loss_b, grads_b = _loss_and_grads(lean, ids)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    with torch.no_grad():  # the reference/evaluation path runs the module as written
        assert torch.equal(plain(input_ids=ids).logits, lean(input_ids=ids).logits)


def _saved_mlp_wide_tensors(model, ids) -> int:
    """How many distinct [tokens × intermediate] storages autograd keeps after a forward pass."""
    storages = set()

    def pack(t):
        if t.shape and t.shape[-1] == INTERMEDIATE and t.numel() == ids.numel() * INTERMEDIATE:  # not weights
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum().backward()
    return len(storages)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_half_of_the_mlp_activations_are_kept(lora):
    plain, lean = _pair(lora)
    ids = torch.randint(1, 64, (2, 11))
    # per layer: gate, act(gate), up and their product, against gate and up
    assert _saved_mlp_wide_tensors(plain, ids) == 4 * 3
    assert _saved_mlp_wide_tensors(lean, ids) == 2 * 3


def test_the_product_is_freed_after_the_forward_pass(monkeypatch):
    import gc
    import weakref

    import dpokit.models.gated_mlp as gated_mlp

    products = []
    real_apply = gated_mlp._GatedProduct.apply

    def apply(*args):
        product = real_apply(*args)
        products.append(weakref.ref(product))
        return product

    monkeypatch.setattr(gated_mlp._GatedProduct, "apply", apply)
    _, lean = _pair(lora=True)
    loss = lean(input_ids=torch.randint(1, 64, (2, 11))).logits.sum()
    gc.collect()
    assert len(products) == 3 and all(ref() is None for ref in products)  # rebuilt in backward, not kept
    loss.backward()


def test_other_mlps_are_left_alone():
    model = make_gpt2(vocab_size=64)
    assert keep_less_in_gated_mlps(model) == 0

    class Scaled(torch.nn.Module):  # gate/up/down attributes, but another formula
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 2)

    assert keep_less_in_gated_mlps(Scaled()) == 0
