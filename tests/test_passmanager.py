"""The pass manager: report, instrumentation, dump dir, verifier switch, failures."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch

import prunec
from prunec.errors import PassFailure
from prunec.ir import Node, Value
from prunec.passmanager import DumpDir, PassManager, PrintIRAfterChange
from prunec.registry import PassResult, register_pass

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _passes(registry_snapshot):
    @register_pass("test-break-const", summary="Declare a wrong constant shape.")
    def break_const(graph, am):
        graph.consts["fc.bias"].shape = (3,)
        return PassResult(True)

    @register_pass("test-bad-node", summary="Insert an op whose operands do not fit.")
    def bad_node(graph, am):
        relu = graph.node("relu")
        n = Node("bad_add", aten.add.Tensor, (relu.out, graph.consts["fc.weight"]), {},
                 [Value("bad_add", relu.out.shape, torch.float32)], False)
        graph.nodes.insert(graph.nodes.index(relu) + 1, n)
        return PassResult(True)

    @register_pass("test-swap", summary="Move a node after its user.")
    def swap(graph, am):
        a, b = graph.node("relu"), graph.node("mean")
        i, j = graph.nodes.index(a), graph.nodes.index(b)
        graph.nodes[i], graph.nodes[j] = b, a
        return PassResult(True)

    @register_pass("test-crash", summary="A pass with a bug.")
    def crash(graph, am):
        raise ZeroDivisionError("division by zero in my pass")
    yield


def test_report_records_each_pass(tiny):
    model, x = tiny
    n_params = sum(p.numel() for p in model.parameters())
    res = prunec.compile(model, (x,), passes="fold-bn,canonicalize,dce")
    recs = res.report["passes"]
    assert [r["pass"] for r in recs] == ["fold-bn", "canonicalize", "dce"]
    assert [r["changed"] for r in recs] == [True, False, False]
    for r in recs:
        assert r["seconds"] >= 0 and set(r["before"]) == set(r["after"]) == {"params", "flops", "bytes"}
    fold = recs[0]
    assert fold["before"]["params"] == n_params
    # bn weight+bias (8) go, the conv gains a bias (4)
    assert fold["after"]["params"] == n_params - 8 + 4
    assert fold["before"]["flops"] == fold["after"]["flops"] == 2 * (4 * 8 * 8 * 27) + 2 * 2 * 4
    assert fold["after"]["bytes"] < fold["before"]["bytes"]
    assert fold["stats"] == {"batchnorms-folded": 1, "constants-removed": 5}
    assert res.report["before"]["params"] == n_params and res.report["after"]["params"] == n_params - 4
    assert res.report["ratios"]["params"] == round(n_params / (n_params - 4), 4)
    assert res.report["module-update"] == {"ok": True, "problems": []}
    json.dumps(res.report)


def test_print_ir_after_change(tiny):
    buf = io.StringIO()
    g = prunec.trace(tiny[0], (tiny[1],))
    PassManager("canonicalize,fold-bn,dce,test-break-const", verify_each=False,
                instrumentations=[PrintIRAfterChange(buf)]).run(g)
    out = buf.getvalue()
    # unchanged passes are not printed (fold-bn already dropped the unused buffer dce would remove)
    assert "// -----// IR after canonicalize" not in out and "// -----// IR after dce" not in out
    assert out.count("// -----// IR after") == 2
    assert "// -----// IR after test-break-const //----- //\n" in out
    fold_ir = out.split("// -----// IR after fold-bn //----- //\n")[1].split("// -----//")[0]
    assert "batch_norm" not in fold_ir and "parameter @conv.bias: f32[4]" in fold_ir
    assert out.endswith(prunec.print_graph(g))


def test_dump_dir_one_file_per_pass(tiny, tmp_path):
    d = tmp_path / "dump"
    g = prunec.trace(tiny[0], (tiny[1],))
    before = prunec.print_graph(g)
    PassManager("fold-bn,canonicalize,dce", instrumentations=[DumpDir(str(d))], dump_dir=str(d)).run(g)
    assert sorted(os.listdir(d)) == ["00_input.txt", "01_fold-bn.txt", "02_canonicalize.txt", "03_dce.txt"]
    assert (d / "00_input.txt").read_text() == before
    assert (d / "03_dce.txt").read_text() == prunec.print_graph(g)
    assert "num_batches_tracked" not in (d / "01_fold-bn.txt").read_text()


def test_verifier_on_by_default_and_switchable(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    with pytest.raises(PassFailure, match=r"pass 'test-break-const' failed: constant @fc.bias is declared f32\[3\]"):
        PassManager("dce,test-break-const").run(g)
    g = prunec.trace(tiny[0], (tiny[1],))
    recs = PassManager("dce,test-break-const", verify_each=False).run(g)
    assert [r.name for r in recs] == ["dce", "test-break-const"]
    with pytest.raises(prunec.IRError):
        prunec.verify(g)


def test_failure_names_pass_pipeline_and_node(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    with pytest.raises(PassFailure) as e:
        PassManager("fold-bn,dce,test-bad-node,canonicalize").run(g)
    msg = str(e.value)
    assert msg.startswith("pass 'test-bad-node' failed at node %bad_add: node %bad_add (add): operands do not fit")
    assert msg.endswith("(pipeline so far: 'fold-bn,dce')")
    assert e.value.node == "bad_add" and "\n" not in msg


def test_use_before_def_after_pass_names_node(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    with pytest.raises(PassFailure, match=r"pass 'test-swap' failed at node %mean: node %mean \(mean\) uses %relu "
                                          r"before it is defined \(pipeline so far: ''\)"):
        PassManager("test-swap").run(g)


def test_exception_in_pass_names_type(tiny):
    g = prunec.trace(tiny[0], (tiny[1],))
    with pytest.raises(PassFailure, match=r"pass 'test-crash' failed: ZeroDivisionError: division by zero in my pass "
                                          r"\(pipeline so far: 'canonicalize'\)"):
        PassManager("canonicalize,test-crash").run(g)


def test_failure_with_dump_dir_saves_reproducer(tiny, tmp_path):
    model, x = tiny
    d = tmp_path / "dump"
    with pytest.raises(PassFailure) as e:
        prunec.compile(model, (x,), passes="fold-bn,test-bad-node", dump_dir=str(d))
    assert f"reproducer saved in {d}" in str(e.value)
    files = sorted(os.listdir(d))
    assert files == ["00_input.txt", "01_fold-bn.txt", "reproducer.json", "reproducer.pt2", "reproducer.txt"]
    # the reproducer is the IR the failing pass received
    assert (d / "reproducer.txt").read_text() == (d / "01_fold-bn.txt").read_text()
    info = json.loads((d / "reproducer.json").read_text())
    assert info["failed-pass"] == "test-bad-node" and info["pipeline-so-far"] == "fold-bn"
    assert "operands do not fit" in info["error"] and info["traceback"]
    assert info["rerun"].startswith(f"prunec compile {d}/reproducer.pt2 --passes 'test-bad-node'")
    ep = torch.export.load(str(d / "reproducer.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-6)
    # rerunning the reproducer fails the same way
    with pytest.raises(PassFailure, match="test-bad-node"):
        prunec.compile(str(d / "reproducer.pt2"), passes="test-bad-node")


def test_pass_instances_list(tiny):
    from prunec.registry import PASSES
    g = prunec.trace(tiny[0], (tiny[1],))
    recs = PassManager([PASSES["dce"]()]).run(g)
    assert recs[0].changed and recs[0].stats == {"nodes-removed": 0, "constants-removed": 1}
