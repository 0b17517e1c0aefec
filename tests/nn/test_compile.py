"""torch.compile(fullgraph=True) on models with MDN layers: no graph breaks, eager results."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from metanorm.nn import MetadataNorm, MetadataSequential


def _design(n=300):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n, 1), generator=g).float()
    return torch.cat([y, torch.randn(n, 1, generator=g) + y, torch.ones(n, 1)], dim=1)


def _model(design, on_nonfinite="skip"):
    torch.manual_seed(0)
    return MetadataSequential(
        torch.nn.Linear(6, 8),
        MetadataNorm(8, design, keep=[0], on_nonfinite=on_nonfinite),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 4),
        MetadataNorm(4, design, keep=[0], momentum=None),
    )


def _train_and_compare(compiled, eager, comp_model, design, x, epochs, batch, counts=None):
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            xb, rb = x[i : i + batch], design[i : i + batch]
            out_e, out_c = eager(xb, rb), compiled(xb, rb)
            torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
            g = torch.randn_like(out_e)
            out_e.backward(g)
            out_c.backward(g)
            for pe, pc in zip(eager.parameters(), comp_model.parameters(), strict=True):
                torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-5)
            eager.zero_grad()
            comp_model.zero_grad()
            if counts is not None:
                counts.append(counts[0].frame_count)
    for be, bc in zip(eager.buffers(), comp_model.buffers(), strict=True):
        torch.testing.assert_close(bc, be, atol=1e-5, rtol=1e-5)


def test_fullgraph_train_and_eval_match_eager_and_short_batch_compiles_once():
    design = _design()
    x = torch.randn(300, 6)
    eager, comp_model = _model(design), _model(design)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(comp_model, fullgraph=True, backend=counter)
    # 300 = 4 × 64 + 44: the short last batch makes the batch size dynamic once, not per epoch
    counts = [counter]
    _train_and_compare(compiled, eager, comp_model, design, x, 3, 64, counts)
    per_step = counts[1:]
    assert per_step[4] == per_step[0] + 1  # the first short batch: one recompile
    assert per_step[-1] == per_step[4]  # none after it
    assert int(comp_model[1].num_batches_tracked) == 15
    eager.eval()
    comp_model.eval()
    torch.testing.assert_close(compiled(x, design), eager(x, design), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled(x[:7], design[:7]), eager(x[:7], design[:7]))
    assert counter.frame_count == per_step[-1] + 1  # evaluation: one graph for any batch size


def test_dynamic_batch_dimension_compiles_one_graph():
    design = _design()
    x = torch.randn(300, 6)
    counter = CompileCounterWithBackend("aot_eager")
    model = _model(design)
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    compiled(x[:64], design[:64]).sum().backward()
    first = counter.frame_count
    for batch in (64, 50, 37):
        for i in range(0, 300, batch):
            compiled(x[i : i + batch], design[i : i + batch]).sum().backward()
    assert counter.frame_count == first


def test_nonfinite_batch_is_counted_inside_the_graph():
    design = _design()
    model = _model(design)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(64, 6)
    compiled(x, design[:64])
    before = model[1].running_beta.clone()
    bad = x.clone()
    bad[0, 0] = float("nan")
    compiled(bad, design[:64])
    assert int(model[1].num_batches_skipped) == 1 and int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_beta, before, atol=0, rtol=0)


def test_raise_policy_is_a_graph_break():
    """Documented cost: "raise" reads a flag on the host, so fullgraph compilation refuses it."""
    design = _design()
    compiled = torch.compile(_model(design, "raise"), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"(?i)data-dependent|graph break|Unsupported"):
        compiled(torch.randn(64, 6), design[:64])


def test_inductor_matches_eager():
    design = _design()
    x = torch.randn(300, 6)
    eager, comp_model = _model(design), _model(design)
    compiled = torch.compile(comp_model, fullgraph=True)
    _train_and_compare(compiled, eager, comp_model, design, x, epochs=1, batch=128)
    eager.eval()
    comp_model.eval()
    torch.testing.assert_close(compiled(x, design), eager(x, design), atol=1e-5, rtol=1e-5)
