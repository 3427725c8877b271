"""aiayn.inference: prepare() makes a new model and leaves the caller's alone; the fast pieces it
hands to the paper code (attention, beam step) give what the paper code gives."""

import pytest
import torch

from aiayn.model.attention import MultiHeadAttention, padding_mask, reference_attention, scaled_dot_product_attention
from aiayn.inference import beam_step_for, fused_beam_step, prepare
from aiayn.inference.attention import cpu_attention, summed_attention
from aiayn.inference.beam_step import block_beam_step
from aiayn.decoding.search import beam_search, log_prob_step
from conftest import tiny_model

PAD = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summed_attention_equals_reference(dtype):
    # Rows of 4 queries (a sentence's beams) against padded keys, as in compiled beam search.
    torch.manual_seed(3)
    q, k, v = (torch.randn(3, 2, n, 8).to(dtype) for n in (4, 6, 6))
    tokens = torch.randint(4, 20, (3, 6))
    tokens[1, -2:] = PAD
    tokens[2, 1:] = PAD
    mask = padding_mask(tokens, PAD)
    ref_out, _ = reference_attention(q.double(), k.double(), v.double(), mask)
    out = summed_attention(q, k, v, mask)
    assert out.dtype == dtype and out.shape == (3, 2, 4, 8)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref_out).abs().max().item() < tolerance
    # A key behind the mask changes nothing; the last row attends to its one real key alone.
    k2 = k.clone()
    k2[1, :, -1] = 100.0
    assert torch.equal(summed_attention(q, k2, v, mask), out)
    assert torch.allclose(out[2].float(), v[2, :, :1].float().expand(-1, 4, -1))


@pytest.mark.parametrize("queries, incremental", [(1, True), (4, True), (5, False)])
def test_cpu_attention_equals_the_models_attention(queries, incremental):
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 2, queries, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = padding_mask(torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, PAD, PAD, PAD]]), PAD)
    ours, none = cpu_attention(q, k, v, mask, incremental=incremental)
    theirs, _ = scaled_dot_product_attention(q, k, v, mask, incremental=incremental)
    assert none is None
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    weights_ours = cpu_attention(q, k, v, mask, need_weights=True)[1]
    torch.testing.assert_close(weights_ours, reference_attention(q, k, v, mask)[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_prepare_returns_a_new_model_and_leaves_the_callers_alone(precision):
    model = tiny_model().train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kinds = [type(module) for module in model.modules()]
    prepared = prepare(model, precision=precision, device="cpu")
    assert prepared is not model and not prepared.training
    assert model.training and [type(module) for module in model.modules()] == kinds
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    attends = {module.attend for module in model.modules() if isinstance(module, MultiHeadAttention)}
    assert attends == {scaled_dot_product_attention}  # the paper's function stays the model's
    prepared_attends = {m.attend for m in prepared.modules() if isinstance(m, MultiHeadAttention)}
    assert prepared_attends == {cpu_attention}


def test_prepared_model_with_the_fast_step_translates_as_the_plain_model():
    model = tiny_model(seed=1)
    with torch.no_grad():
        model.output_projection.weight.mul_(2.0)
    src = torch.randint(4, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    src[1, -2:] = PAD
    prepared = prepare(model, precision="fp32", device="cpu")
    step = beam_step_for("cpu")
    if fused_beam_step.available():
        assert step is fused_beam_step.fused_beam_step
    with torch.inference_mode():
        plain = beam_search(model, src, beam_size=3, nbest=3, max_len_b=8)
        fast = beam_search(prepared, src, beam_size=3, nbest=3, max_len_b=8, step=step)
    assert [[h.tokens for h in hyps] for hyps in fast] == [[h.tokens for h in hyps] for hyps in plain]
    for ours, theirs in zip(fast, plain):
        torch.testing.assert_close([h.score for h in ours], [h.score for h in theirs], rtol=1e-4, atol=1e-4)
    on_gpu = beam_step_for("cuda")  # log_prob_step selecting by block maxima
    assert on_gpu.func is log_prob_step and on_gpu.keywords == {"select": block_beam_step}


def _imports_of_every_module() -> dict[str, set[str]]:
    """aiayn's modules (dotted names) and the aiayn modules each imports, anywhere in its file."""
    import ast
    from pathlib import Path

    import aiayn

    root = Path(aiayn.__file__).parent
    modules = {".".join(("aiayn", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): path
               for path in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aiayn"):
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.startswith("aiayn")}
        graph[name] = (imported & modules.keys()) - {name}
    return graph


def test_paper_modules_import_nothing_from_the_inference_package():
    graph = _imports_of_every_module()
    paper = [name for name in graph if name.startswith(("aiayn.model", "aiayn.training"))]
    for name in [*paper, "aiayn.decoding.search", "aiayn.config"]:
        assert not any(module.startswith("aiayn.inference") for module in graph[name]), name
    # The model is the bottom layer: it imports only the configuration.
    for name in (n for n in graph if n.startswith("aiayn.model")):
        assert all(module.startswith(("aiayn.model", "aiayn.config")) for module in graph[name]), name


def test_no_two_modules_import_each_other_even_through_others():
    graph = _imports_of_every_module()
    packages = {name for name in graph if any(other.startswith(name + ".") for other in graph)}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [m for m in graph[start] if m not in packages]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(m for m in graph[module] if m not in packages)
        return seen

    cycles = sorted(name for name in graph if name not in packages and name in reachable(name))
    assert cycles == []
