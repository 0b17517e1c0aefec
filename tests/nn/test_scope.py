"""Metadata in scope: MetadataModel, metadata_scope, threads, replicas, compile, checkpointing."""

import copy
import pickle
import threading

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from metanorm.nn import (
    MetadataModel,
    MetadataNorm,
    MetadataSequential,
    convert_metadata_norm,
    current_metadata,
    metadata_scope,
)
from metanorm.nn import scope as mscope


def _design(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n, 1), generator=g).double()
    return torch.cat(
        [y, torch.randn(n, 1, generator=g, dtype=torch.double) + y, torch.ones(n, 1)], 1
    )


class _Net(nn.Module):
    """forward(x) only; its MDN layers are called with one argument."""

    def __init__(self, design, wait=None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.mdn1 = MetadataNorm(6, design, keep=[0])
        self.mdn2 = MetadataNorm(3, design, keep=[0], momentum=None)
        self.wait = wait

    def forward(self, x):
        h = self.fc1(x)
        if self.wait is not None:
            self.wait()
        return self.mdn2(self.fc2(torch.relu(self.mdn1(h))))

    def explicit(self, x, rows):
        return self.mdn2(self.fc2(torch.relu(self.mdn1(self.fc1(x), rows))), rows)


def _pair(design):
    torch.manual_seed(0)
    a = _Net(design).double()
    b = copy.deepcopy(a)
    return a, b


def test_scope_gives_the_explicit_results_train_and_eval():
    design = _design()
    net, ref = _pair(design)
    model = MetadataModel(net)
    x = torch.randn(200, 5, dtype=torch.double)
    for i in range(0, 200, 50):
        out = model(x[i : i + 50], metadata=design[i : i + 50])
        expected = ref.explicit(x[i : i + 50], design[i : i + 50])
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        g = torch.randn_like(out)
        out.backward(g)
        expected.backward(g)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0)
    for b, c in zip(net.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, c, atol=1e-12, rtol=0)
    model.eval()
    ref.eval()
    torch.testing.assert_close(
        model(x, metadata=design), ref.explicit(x, design), atol=1e-12, rtol=0
    )
    assert current_metadata() is None  # the scope ends with the call


def test_metadata_sequential_inside_a_scope_takes_the_rows():
    design = _design()
    seq = MetadataSequential(nn.Linear(5, 4), MetadataNorm(4, design, keep=[0])).double()
    ref = copy.deepcopy(seq)
    x = torch.randn(20, 5, dtype=torch.double)
    out = MetadataModel(nn.Sequential(seq, nn.ReLU()))(x, metadata=design[:20])
    torch.testing.assert_close(out, torch.relu(ref(x, design[:20])), atol=1e-12, rtol=0)


def test_errors_say_how_to_pass_metadata():
    design = _design()
    net, _ = _pair(design)
    x = torch.randn(8, 5, dtype=torch.double)
    with pytest.raises(TypeError, match=r"without metadata and none is in scope.*metadata=rows"):
        net(x)  # the inner model called directly
    with pytest.raises(TypeError, match="metadata"):
        MetadataModel(net)(x)  # keyword missing
    with pytest.raises(TypeError, match=r"expected metadata .* tensor .* got list"):
        MetadataModel(net)(x, metadata=[[1.0, 2.0, 1.0]] * 8)
    with pytest.raises(ValueError, match=r"one design row per sample.*shape \(7, 3\)"):
        MetadataModel(net)(x, metadata=design[:7])
    with pytest.raises(ValueError, match=r"expected metadata of shape \(8, 3\)"):
        MetadataModel(net)(x, metadata=design[:8, :2])
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        MetadataModel(lambda x: x)


def test_nested_scopes_each_see_their_own_rows():
    design = _design()
    torch.manual_seed(0)
    inner = _Net(design).double()
    outer_mdn = MetadataNorm(3, design, keep=[0]).double()
    inner_model = MetadataModel(inner)
    other = torch.flip(design, [0])

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.mdn = inner_model, outer_mdn

        def forward(self, x):
            h = self.inner(x, metadata=other[: len(x)])  # a nested call with other rows
            return self.mdn(h)  # back to the outer rows

    ref_inner, ref_mdn = copy.deepcopy(inner), copy.deepcopy(outer_mdn)
    x = torch.randn(40, 5, dtype=torch.double)
    out = MetadataModel(Outer())(x, metadata=design[:40])
    expected = ref_mdn(ref_inner.explicit(x, other[:40]), design[:40])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    with metadata_scope(design[:40]):
        assert current_metadata() is not None
        with metadata_scope(other[:40]):
            torch.testing.assert_close(current_metadata(), other[:40])
        torch.testing.assert_close(current_metadata(), design[:40])


def _run_threads(targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except Exception as e:  # reported below
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_two_threads_one_model_get_their_own_results():
    """Both threads are inside model(x, metadata=...) before either MDN layer reads its rows."""
    design = _design()
    barrier = threading.Barrier(2, timeout=20)
    torch.manual_seed(0)
    net = _Net(design, wait=barrier.wait).double().eval()
    for layer in (net.mdn1, net.mdn2):
        layer.running_beta.normal_()  # an evaluation β that depends on the rows
    model = MetadataModel(net)
    x = torch.randn(2, 30, 5, dtype=torch.double)
    rows = [design[:30], torch.flip(design, [0])[:30]]
    results = [None, None]

    def call(i):
        return lambda: results.__setitem__(i, model(x[i], metadata=rows[i]))

    _run_threads([call(0), call(1)])
    net.wait = None
    for i in range(2):
        torch.testing.assert_close(results[i], net.explicit(x[i], rows[i]), atol=1e-12, rtol=0)
    assert not torch.allclose(results[0], net.explicit(x[0], rows[1]))


def test_dataparallel_style_replicas_in_threads():
    """DataParallel(MetadataModel(m)) scatters metadata= and calls each replica in a thread
    (threads do not inherit context variables): each replica's forward sets its own scope."""
    design = _design()
    torch.manual_seed(0)
    model = MetadataModel(_Net(design).double())
    replicas = [model, copy.deepcopy(model)]
    ref = copy.deepcopy(model.module)
    x = torch.randn(64, 5, dtype=torch.double)
    shards = [(x[:32], design[:32]), (x[32:], design[32:64])]
    results = [None, None]

    def call(i):
        xs, rs = shards[i]
        return lambda: results.__setitem__(i, replicas[i](xs, metadata=rs))

    _run_threads([call(0), call(1)])
    for i, (xs, rs) in enumerate(shards):
        torch.testing.assert_close(
            results[i], copy.deepcopy(ref).explicit(xs, rs), atol=1e-12, rtol=0
        )


def _checkpointed(design, fn):
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _Net(design).double()

        def forward(self, x):
            return fn(self.net, x)

    return Blocks()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_carries_the_rows_into_the_recomputation(reentrant):
    design = _design()
    model = MetadataModel(
        _checkpointed(design, lambda net, x: mscope.checkpoint(net, x, use_reentrant=reentrant))
    )
    ref = copy.deepcopy(model.module.net)
    x = torch.randn(40, 5, dtype=torch.double, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out = model(x, metadata=design[:40])
    assert current_metadata() is None  # backward runs outside the call
    out.pow(2).sum().backward()
    ref.explicit(xr, design[:40]).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-12, rtol=0)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0)


def test_plain_checkpoint_says_to_use_ours():
    design = _design()
    plain = lambda net, x: torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False)  # noqa: E731
    model = MetadataModel(_checkpointed(design, plain))
    out = model(torch.randn(40, 5, dtype=torch.double, requires_grad=True), metadata=design[:40])
    with pytest.raises(TypeError, match=r"backward pass.*metanorm.nn.scope.checkpoint"):
        out.sum().backward()


def _train_compare(compiled, eager, comp_model, x, design, batch=50):
    for i in range(0, len(x), batch):
        xb, rb = x[i : i + batch], design[i : i + batch]
        out_c, out_e = compiled(xb, metadata=rb), eager(xb, metadata=rb)
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        out_c.sum().backward()
        out_e.sum().backward()
    for p, q in zip(comp_model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    for b, c in zip(comp_model.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)


def test_compiled_metadata_model_is_one_graph():
    """Compiling the wrapper: one graph, with a converted layer (a forward hook) inside too."""
    design = _design().float()
    torch.manual_seed(0)
    comp_model = convert_metadata_norm(_Net(design), design, after=["fc1"], keep=[0])
    comp_model(torch.randn(8, 5), metadata=design[:8])  # sizes the lazy layer
    eager = copy.deepcopy(comp_model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(comp_model, fullgraph=True, backend=counter)
    x = torch.randn(200, 5)
    _train_compare(compiled, eager, comp_model, x, design)
    graphs = counter.frame_count
    comp_model.eval()
    eager.eval()
    torch.testing.assert_close(compiled(x, metadata=design), eager(x, metadata=design))
    assert counter.frame_count == graphs + 1  # evaluation: one more graph, no break
    assert mscope._TRACE_STACK == []


def test_compiled_inner_model_breaks_the_graph_at_each_layer_but_is_correct():
    """MetadataModel(torch.compile(net)): the scope is set eagerly, and each MDN layer reads it
    outside the graph (a graph break); fullgraph=True therefore refuses it."""
    design = _design().float()
    torch.manual_seed(0)
    net = _Net(design)
    eager = MetadataModel(copy.deepcopy(net))
    x = torch.randn(50, 5)
    torch._dynamo.reset()
    broken = MetadataModel(torch.compile(net, backend="eager"))
    torch.testing.assert_close(broken(x, metadata=design[:50]), eager(x, metadata=design[:50]))
    explain = torch._dynamo.explain(copy.deepcopy(net).forward)
    with metadata_scope(design[:50]):
        report = explain(x)
    # every break is the scope read (2 layers; dynamo counts a break per frame it splits)
    assert report.graph_break_count >= 2
    assert all("_scope_entries" in b.reason for b in report.break_reasons)
    strict = MetadataModel(torch.compile(copy.deepcopy(net), fullgraph=True, backend="eager"))
    with pytest.raises(Exception, match=r"(?i)skip|disable|Unsupported"):
        strict(x, metadata=design[:50])


def test_state_dict_deepcopy_and_pickle():
    design = _design()
    torch.manual_seed(0)
    model = MetadataModel(_Net(design).double())
    x = torch.randn(60, 5, dtype=torch.double)
    model(x, metadata=design[:60])
    model.eval()
    expected = model(x, metadata=design[:60])
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(other(x, metadata=design[:60]), expected, atol=0, rtol=0)
    torch.manual_seed(1)
    fresh = MetadataModel(_Net(design).double()).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x, metadata=design[:60]), expected, atol=0, rtol=0)
    assert "module.mdn1.running_beta" in model.state_dict()


def test_distributed_data_parallel_passes_metadata(tmp_path):
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed not available, or a process group is already set")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        design = _design()
        torch.manual_seed(0)
        net = _Net(design).double()
        ref = copy.deepcopy(net)
        ddp = nn.parallel.DistributedDataParallel(MetadataModel(net))
        x = torch.randn(40, 5, dtype=torch.double)
        out = ddp(x, metadata=design[:40])
        expected = ref.explicit(x, design[:40])
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        out.sum().backward()
        expected.sum().backward()
        for p, q in zip(net.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0)
    finally:
        dist.destroy_process_group()
