"""tsdae.model.fast.linear: fp32 CPU products on oneDNN, equal to F.linear within fp32 rounding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tsdae.model.fast import linear
from tsdae.model.fast.linear import FastLinear, bucket_rows, fast_linear, layer_on_onednn, runs_on_onednn, use_fast_linear

needs_onednn = pytest.mark.skipif(not linear.available(), reason="this torch build has no oneDNN linear op")


def _grads(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


@needs_onednn
@pytest.mark.parametrize("lead", [(37,), (3, 21), (16,), (1,)])
def test_output_and_every_gradient_match_f_linear(lead):
    torch.manual_seed(0)
    x, w, b = torch.randn(*lead, 48), torch.randn(40, 48), torch.randn(40)
    g = torch.randn(*lead, 40)
    assert runs_on_onednn(x, w)
    for ours, plain in zip(_grads(fast_linear, x, w, b, g), _grads(F.linear, x, w, b, g)):
        assert ours.shape == plain.shape
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_products_are_fp32_not_an_implicit_bf16():
    torch.manual_seed(0)
    x, w = torch.randn(64, 384), torch.randn(1536, 384)
    exact = x.double() @ w.double().t()
    ours_err = (fast_linear(x, w).double() - exact).abs().max().item()
    mkl_err = (F.linear(x, w).double() - exact).abs().max().item()
    bf16_err = (F.linear(x.bfloat16(), w.bfloat16()).double() - exact).abs().max().item()
    assert ours_err < 10 * mkl_err
    assert ours_err < bf16_err / 100


def test_row_buckets():
    assert [bucket_rows(n) for n in (1, 15, 16, 17, 32, 255)] == [16, 16, 16, 32, 32, 256]
    assert [bucket_rows(n) for n in (256, 257, 1000, 5000)] == [256, 288, 1024, 5120]
    for n in range(1, 20000, 7):
        assert n <= bucket_rows(n) < max(n * 1.125, n + 16)
    assert len({bucket_rows(n) for n in range(1025, 2049)}) == 8


@needs_onednn
def test_bias_free_layer_and_input_without_grad():
    torch.manual_seed(0)
    x, w, g = torch.randn(5, 8), torch.randn(6, 8, requires_grad=True), torch.randn(5, 6)
    fast_linear(x, w).backward(g)
    torch.testing.assert_close(w.grad, g.t() @ x, rtol=1e-5, atol=1e-6)


def test_other_dtypes_autocast_and_empty_inputs_take_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(linear._OneDNNLinear, "apply", lambda *a: calls.append(a))
    w = torch.randn(6, 8)
    assert not runs_on_onednn(torch.randn(3, 8, dtype=torch.float64), w.double())
    assert not runs_on_onednn(torch.randn(0, 8), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs_on_onednn(torch.randn(3, 8), w)
        out = fast_linear(torch.randn(3, 8), w)
    assert out.dtype == torch.bfloat16 and not calls
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(fast_linear(x, w.double()), F.linear(x, w.double()))


@needs_onednn
def test_torch_compile_keeps_the_onednn_products_as_an_opaque_op():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    layer = FastLinear(8, 6)
    x = torch.randn(5, 8, requires_grad=True)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes])
        return make_boxed_func(graph_module.forward)

    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), dynamic=True)
    y = compiled(x)
    y.backward(torch.ones_like(y))
    expected = _grads(F.linear, x.detach(), layer.weight.detach(), layer.bias.detach(), torch.ones(5, 6))
    for ours, plain in zip((y.detach(), x.grad, layer.weight.grad, layer.bias.grad), expected):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    forward, backward = graphs
    assert forward.count("tsdae.onednn_product.default") == 1  # y
    assert backward.count("tsdae.onednn_product.default") == 2  # dx and dW
    assert not any("mkldnn" in t or t.startswith(("aten.mm", "aten.addmm")) for t in forward + backward)


def test_use_fast_linear_keeps_modules_parameters_and_ties():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4))
    model[2].weight = nn.Parameter(model[0].weight.t().contiguous())
    shared = nn.Linear(4, 4)
    model.append(shared)
    model.append(nn.Sequential(shared))  # the same layer twice: changed once
    before = [id(m) for m in model.modules()], [id(p) for p in model.parameters()], model.state_dict()
    assert not layer_on_onednn(model[0], torch.randn(2, 4))
    assert use_fast_linear(model) == 3
    assert layer_on_onednn(model[0], torch.randn(2, 4)) == linear.available()
    assert not layer_on_onednn(model[0], torch.randn(2, 4, dtype=torch.float64))
    assert all(type(m) is FastLinear for m in model.modules() if isinstance(m, nn.Linear))
    assert [id(m) for m in model.modules()] == before[0] and [id(p) for p in model.parameters()] == before[1]
    assert model.state_dict().keys() == before[2].keys()
    assert use_fast_linear(model) == 0
    assert use_fast_linear(model, fast=False) == 3
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_build_tsdae_uses_fast_linear_and_the_loss_still_matches_plain_linear(tiny_bert_no_dropout_dir):
    from tsdae.model import ModelConfig
    from tsdae.model import build_tsdae

    model, tok = build_tsdae(ModelConfig(name_or_path=tiny_bert_no_dropout_dir, pooling="cls"))
    assert all(type(m) is FastLinear for m in model.modules() if isinstance(m, nn.Linear))
    enc = tok(["a first sentence here", "two"], padding=True, return_tensors="pt")
    target = tok(["a first sentence here , longer", "two words"], padding=True, return_tensors="pt").input_ids

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(enc.input_ids, enc.attention_mask, target)
        loss.backward()
        return loss.detach(), {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}

    fast_loss, fast_grads = loss_and_grads()
    use_fast_linear(model, fast=False)
    plain_loss, plain_grads = loss_and_grads()
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
