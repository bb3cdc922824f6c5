"""Shape propagation's hand-written rules (ops laid out like their input) agree with ATen's meta
kernels, and a batch norm whose parameters no longer fit its input is still caught."""
from __future__ import annotations

import pytest
import torch

from prunec import shapes

aten = torch.ops.aten
META = torch.device("meta")


def _layouts():
    yield torch.empty(2, 8, 5, 5, device=META)
    yield torch.empty(2, 8, 5, 5, device=META).to(memory_format=torch.channels_last)
    yield torch.empty(3, 7, device=META, dtype=torch.float16)
    yield torch.empty(4, 6, 9, device=META, dtype=torch.bfloat16)
    yield torch.empty(2, 8, 5, 5, device=META).transpose(2, 3)  # not dense in either format: meta decides
    yield torch.empty(2, 8, 5, 5, device=META, dtype=torch.int64)  # integer: meta decides


_CALLS = {
    aten.relu.default: (), aten.relu6.default: (), aten.hardtanh.default: (-1.0, 2.0),
    aten.hardswish.default: (), aten.hardsigmoid.default: (), aten.sigmoid.default: (),
    aten.silu.default: (), aten.gelu.default: (), aten.tanh.default: (), aten.clamp.default: (0.0, None),
    aten.dropout.default: (0.1, False), aten.leaky_relu.default: (0.2,), aten.elu.default: (),
    aten.mish.default: (), aten.softplus.default: (),
}


def test_every_rule_is_tested():
    assert set(_CALLS) | {aten.batch_norm.default} == set(shapes._SAME_AS_INPUT)


def _same(a, b):
    assert (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


@pytest.mark.parametrize("op", list(_CALLS), ids=lambda op: str(op))
def test_unary_rule_matches_meta_kernel(op):
    claimed = 0
    for x in _layouts():
        fast = shapes._SAME_AS_INPUT[op](x, *_CALLS[op])
        if fast is None:  # left to the meta kernel: only layouts the rule does not claim
            assert not shapes._dense(x)
            continue
        _same(fast, op(x, *_CALLS[op]))
        claimed += 1
    assert claimed == 4


def test_batch_norm_rule_matches_meta_kernel_and_checks_parameters():
    bn = aten.batch_norm.default
    for x in _layouts():
        if x.dim() < 2 or not x.dtype.is_floating_point:
            continue
        c = x.shape[1]
        p = torch.empty(c, device=META)
        args = (x, p, p, p, p, False, 0.1, 1e-5, True)
        fast, ref = shapes._SAME_AS_INPUT[bn](*args), bn(*args)
        if fast is not None:
            _same(fast, ref)
        bad = torch.empty(c - 1, device=META)
        for i in range(1, 5):  # weight, bias, running mean, running var
            wrong = list(args)
            wrong[i] = bad
            with pytest.raises(RuntimeError, match=f"should contain {c} elements not {c - 1}"):
                (shapes._SAME_AS_INPUT[bn] if fast is not None else bn)(*wrong)


def test_propagate_reports_a_batch_norm_that_no_longer_fits():
    """The verifier's view: a pass that shrank a conv but not its batch norm is an IR error naming
    the node, as it was when the meta kernel checked it."""
    import prunec
    from prunec.errors import IRError
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    g = prunec.trace(model, (torch.randn(1, 3, 8, 8),))
    w = next(n for n in g.tensors if n.endswith("0.weight"))
    g.tensors[w] = g.tensors[w][:6].clone()
    for name, v in g.consts.items():
        if name == w:
            v.shape = tuple(g.tensors[w].shape)
    with pytest.raises(IRError, match=r"batch_norm.*should contain 6 elements not 8"):
        shapes.propagate(g)


def test_operands_by_keyword_are_left_to_the_meta_kernel():
    x = torch.empty(2, 8, 5, 5, device=META)
    p = torch.empty(8, device=META)
    assert shapes._SAME_AS_INPUT[aten.relu.default](input=x) is None
    assert shapes._SAME_AS_INPUT[aten.batch_norm.default](x, p, p, p, p, training=False, momentum=0.1, eps=1e-5,
                                                          cudnn_enabled=True) is None
    _same(shapes._SAME_AS_INPUT[aten.gelu.default](x, approximate="tanh"), aten.gelu.default(x, approximate="tanh"))
