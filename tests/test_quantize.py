"""Int8 inference: quantised linear layers against float32, and a whole model's log-probs."""

import pytest
import torch
import torch.nn.functional as F

from aiayn import ModelConfig, Transformer
from aiayn.model.attention import InProjection
from aiayn.inference.layers import InferenceInProjection
from aiayn.inference.quantize import Int8Linear, quantize_int8


def test_int8_linear_matches_float_to_quantisation_error():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(48, 32) * 0.1, torch.randn(48), torch.randn(5, 7, 32)
    exact = F.linear(x, weight, bias)
    approx = Int8Linear(weight, bias)(x)
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    # Per-row int8 weights and activations: below 1% of the output's scale, never 0.
    error = (approx - exact).abs().max() / exact.abs().max()
    assert 1e-4 < error < 0.02
    # Each row is quantised on its own: a row's output does not depend on the other rows.
    torch.testing.assert_close(Int8Linear(weight, bias)(x[1:2, 3:5]), approx[1:2, 3:5], rtol=0, atol=0)
    assert Int8Linear(weight)(x).sub(exact - bias).abs().max() / exact.abs().max() < 0.03  # no bias


def test_int8_in_projection_parts_equal_the_whole():
    torch.manual_seed(1)
    projection = InProjection(16, 48)
    x = torch.randn(3, 4, 16)
    exact = projection(x)
    torch.testing.assert_close(projection.query(x), exact[..., :16])
    torch.testing.assert_close(projection.key_value(x), exact[..., 16:])
    int8 = InferenceInProjection(projection, Int8Linear)
    whole = int8(x)
    # Same row scales for the input and the weights: the parts are exactly the whole's columns.
    torch.testing.assert_close(int8.query(x), whole[..., :16], atol=0, rtol=0)
    torch.testing.assert_close(int8.key_value(x), whole[..., 16:], atol=0, rtol=0)
    assert (whole - exact).abs().max() < 0.03 * exact.abs().max()


def test_quantized_model_log_probs_stay_close():
    torch.manual_seed(2)
    config = ModelConfig.preset("tiny", vocab_size=100, d_model=64, d_ff=128)
    model = Transformer(config).eval()
    src = torch.randint(4, 100, (3, 9))
    tgt = torch.randint(4, 100, (3, 7))
    with torch.inference_mode():
        exact = torch.log_softmax(model(src, tgt), dim=-1)
    int8 = quantize_int8(_copy_of(model, config))
    with torch.inference_mode():
        approx = torch.log_softmax(int8(src, tgt), dim=-1)
    linear_types = {type(m) for m in int8.modules() if isinstance(m, torch.nn.Linear)}
    assert linear_types == set()  # every linear layer replaced
    assert isinstance(int8.output_projection, Int8Linear)  # the tied projection got an int8 copy
    difference = (exact - approx).abs()
    assert 0 < difference.max().item() < 0.2 and difference.mean().item() < 0.04
    agree = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
    assert agree > 0.9


def _copy_of(model, config):
    copy = Transformer(config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def test_quantize_needs_a_float32_cpu_model():
    model = Transformer(ModelConfig.preset("tiny")).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        quantize_int8(model)
