"""Shape propagation's hand-written rules agree with ATen's meta kernels (shape, strides, dtype) on
every case they claim, leave the others to the meta kernel, and operands that no longer fit (a
batch norm or linear a pass forgot to shrink) are still caught."""
from __future__ import annotations

import pytest
import torch

from prunec import shape_rules, shapes

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
    assert set(_CALLS) | {aten.batch_norm.default} == set(shape_rules.SAME_AS_INPUT)


def _same(a, b):
    assert (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


@pytest.mark.parametrize("op", list(_CALLS), ids=lambda op: str(op))
def test_unary_rule_matches_meta_kernel(op):
    claimed = 0
    for x in _layouts():
        fast = shape_rules.SAME_AS_INPUT[op](x, *_CALLS[op])
        if fast is None:  # left to the meta kernel: only layouts the rule does not claim
            assert not shape_rules._dense(x)
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
        fast, ref = shape_rules.SAME_AS_INPUT[bn](*args), bn(*args)
        if fast is not None:
            _same(fast, ref)
        bad = torch.empty(c - 1, device=META)
        for i in range(1, 5):  # weight, bias, running mean, running var
            wrong = list(args)
            wrong[i] = bad
            with pytest.raises(RuntimeError, match=f"should contain {c} elements not {c - 1}"):
                (shape_rules.SAME_AS_INPUT[bn] if fast is not None else bn)(*wrong)


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
    assert shape_rules.SAME_AS_INPUT[aten.relu.default](input=x) is None
    assert shape_rules.SAME_AS_INPUT[aten.batch_norm.default](x, p, p, p, p, training=False, momentum=0.1, eps=1e-5,
                                                          cudnn_enabled=True) is None
    _same(shape_rules.SAME_AS_INPUT[aten.gelu.default](x, approximate="tanh"), aten.gelu.default(x, approximate="tanh"))


# ---- rules that compute a new shape --------------------------------------------------------

def _e(*shape, dtype=torch.float32, cl=False):
    t = torch.empty(*shape, device=META, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if cl else t


_NEW_SHAPE_CASES = {
    # op: (cases the rule must claim, cases it may leave to the meta kernel)
    aten.add.Tensor: (
        [(_e(1, 8, 5, 5), _e(1, 8, 5, 5)), (_e(1, 8, 5, 5), _e(1, 8, 1, 1)), (_e(1, 8, 1, 1), _e(1, 8, 5, 5)),
         (_e(2, 197, 64), _e(64)), (_e(3, 7), 1.0), (_e(3, 7), 2), (_e(4, 6, dtype=torch.float16), _e(4, 6, dtype=torch.float16)),
         (_e(2, 3), _e(()))],
        [(_e(3, 1), _e(1, 4)), (_e(2, 1, 4), _e(1, 3, 1)), (_e(2, 8, 5, 5, cl=True), _e(2, 8, 1, 1)),
         (_e(2, 8, 5, 5), _e(2, 8, 5, 5, cl=True)), (_e(3, 7), _e(3, 7, dtype=torch.float16)),
         (_e(3, 7, dtype=torch.int64), _e(3, 7, dtype=torch.int64)), (_e(3, 7).t(), _e(7, 3)), (2.0, _e(3, 7)),
         (_e(3, 7), True), (_e(1, 1, 1, 1), _e(1, 1, 1, 1))]),
    aten.linear.default: (
        [(_e(1, 640), _e(1000, 640), _e(1000)), (_e(2, 197, 768), _e(3072, 768)), (_e(8), _e(4, 8), _e(4)),
         (_e(2, 3, 5, 16, dtype=torch.bfloat16), _e(7, 16, dtype=torch.bfloat16), _e(7, dtype=torch.bfloat16))],
        [(_e(197, 2, 768).transpose(0, 1), _e(64, 768)), (_e(4, 8), _e(4, 8).t().contiguous().t())]),
    aten.conv2d.default: (
        [(_e(1, 16, 56, 56), _e(32, 16, 3, 3), _e(32), [1, 1], [1, 1]), (_e(2, 16, 9, 9), _e(16, 1, 3, 3), None, [2, 2], [1, 1],
                                                                     [1, 1], 16),
         (_e(1, 8, 5, 5), _e(16, 8, 1, 1)), (_e(1, 8, 5, 5), _e(16, 8, 1, 1, cl=True)), (_e(1, 3, 224, 224), _e(64, 3, 7, 7), None, [2, 2], [3, 3]),
         (_e(1, 12, 13, 11), _e(6, 4, 3, 2), _e(6), [2, 1], [0, 1], [2, 1], 3), (_e(1, 8, 5, 5), _e(8, 8, 5, 5)),
         (_e(1, 8, 5, 5, dtype=torch.float16), _e(4, 8, 3, 3, dtype=torch.float16))],
        [(_e(2, 8, 5, 5, cl=True), _e(16, 8, 1, 1)), (_e(1, 8, 5, 5), _e(16, 8, 3, 3), None, [1, 1], "same"),
         (_e(1, 8, 5, 5), _e(16, 8, 3, 3), _e(8)), (_e(1, 8, 5, 5), _e(6, 2, 3, 3), None, [1], [0], [1], 4),
         (_e(1, 1, 5, 5), _e(4, 1, 3, 3)), (_e(8, 5, 5), _e(4, 8, 3, 3))]),
    aten.adaptive_avg_pool2d.default: (
        [(_e(1, 8, 7, 7), [1, 1]), (_e(2, 16, 9, 9), [3, 2]), (_e(8, 7, 7), [1, 1])],
        [(_e(2, 8, 7, 7, cl=True), [1, 1]), (_e(1, 8, 1, 1), [1, 1]), (_e(1, 1, 7, 7), [1, 1]),
         (_e(1, 8, 0, 7), [1, 1])]),
    aten.mean.dim: (
        [(_e(1, 8, 7, 7), [2, 3], True), (_e(1, 8, 7, 7), [-1, -2]), (_e(2, 197, 768), [1]), (_e(2, 5, 3), [0], False)],
        [(_e(2, 8, 7, 7, cl=True), [2, 3], True), (_e(2, 5), [])]),
    aten.layer_norm.default: (
        [(_e(2, 197, 768), [768], _e(768), _e(768), 1e-6, True), (_e(2, 7, 7, 96), [96], _e(96), _e(96), 1e-6, True),
         (_e(2, 4, 6), [4, 6]), (_e(3, 8), [8], None, _e(8))],
        [(_e(2, 8, 7, 7, cl=True), [8, 7, 7]), (_e(2, 7, 96).transpose(0, 1), [96])]),
    aten.cat.default: (
        [([_e(1, 8, 5, 5), _e(1, 4, 5, 5)], 1), ([_e(2, 3), _e(5, 3)],), ([_e(2, 3, 4), _e(2, 3, 1)], -1)],
        [([_e(1, 8, 5, 5, cl=True), _e(1, 8, 5, 5, cl=True)], 1), ([_e(1, 8, 1, 1), _e(1, 8, 1, 1)], 1),
         ([_e(2, 3), _e(2, 3, dtype=torch.float16)], 0), ([_e(0), _e(2, 3)], 0)]),
}
_NEW_SHAPE_CASES[aten.sub.Tensor] = _NEW_SHAPE_CASES[aten.mul.Tensor] = _NEW_SHAPE_CASES[aten.div.Tensor] = \
    _NEW_SHAPE_CASES[aten.add.Tensor]

# Operands a pass could leave behind that no longer fit: every rule must leave them to the meta
# kernel, which raises (and propagate turns that into an IR error naming the node).
_MISFITS = {
    aten.add.Tensor: [(_e(1, 8, 5, 5), _e(1, 6, 1, 1)), (_e(1, 8, 5, 5), _e(1, 6, 5, 5))],
    aten.linear.default: [(_e(1, 640), _e(1000, 320), _e(1000)), (_e(1, 640), _e(1000, 640), _e(500))],
    aten.conv2d.default: [(_e(1, 8, 5, 5), _e(16, 4, 3, 3)), (_e(1, 8, 2, 2), _e(16, 8, 3, 3))],
    aten.adaptive_avg_pool2d.default: [(_e(1, 8, 7, 7), [1]), (_e(1, 8, 7, 7), [1, 1, 1])],
    aten.mean.dim: [(_e(1, 8, 7, 7), [4]), (_e(1, 8, 7, 7), [1, 1])],
    aten.layer_norm.default: [(_e(2, 197, 384), [768], _e(768), _e(768)), (_e(2, 197, 768), [768], _e(384))],
    aten.cat.default: [([_e(1, 8, 5, 5), _e(1, 4, 6, 5)], 1), ([_e(1, 8, 5, 5), _e(1, 4, 5)], 1)],
}


def test_every_new_shape_rule_is_tested():
    assert set(_NEW_SHAPE_CASES) == set(shape_rules.RULES) - set(shape_rules.SAME_AS_INPUT)
    assert {op for op in _MISFITS} | {aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor} == set(_NEW_SHAPE_CASES)


@pytest.mark.parametrize("op", list(_NEW_SHAPE_CASES), ids=lambda op: str(op))
def test_new_shape_rule_matches_meta_kernel(op):
    claimed, others = _NEW_SHAPE_CASES[op]
    rule = shape_rules.RULES[op]
    for args in claimed:
        fast = rule(*args)
        assert fast is not None, f"{op} did not claim {args}"
        _same(fast, op(*args))
    for args in others:  # the rule may claim these only where it agrees with the meta kernel
        fast = rule(*args)
        if fast is not None:
            _same(fast, op(*args))
    assert any(rule(*a) is None for a in others), f"{op}: no case left to the meta kernel is tested"


@pytest.mark.parametrize("op", list(_MISFITS), ids=lambda op: str(op))
def test_new_shape_rule_leaves_misfits_to_the_meta_kernel(op):
    for args in _MISFITS[op]:
        assert shape_rules.RULES[op](*args) is None
        with pytest.raises((RuntimeError, IndexError, ValueError)):
            op(*args)


def test_propagate_reports_a_linear_that_no_longer_fits():
    import prunec
    from prunec.errors import IRError
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    g = prunec.trace(model, (torch.randn(2, 6),))
    w = next(n for n in g.tensors if n.endswith("0.weight"))
    g.tensors[w] = g.tensors[w][:5].clone()
    g.consts[w].shape = (5, 6)
    with pytest.raises(IRError, match=r"linear.*operands do not fit"):
        shapes.propagate(g)
