"""Pre-packed (oneDNN) linear layers: the same function as nn.Linear, row by row, in fp32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

from aiayn import ModelConfig, Transformer, hardware
from aiayn.inference import prepack
from aiayn.model.attention import InProjection
from aiayn.inference.layers import InferenceInProjection
from aiayn.inference.prepack import PackedLinear, pack_linear_layers
from aiayn.decoding.search import beam_search

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this PyTorch build has no oneDNN")


def test_packed_linear_equals_linear_and_rows_are_independent():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(300, 64), torch.randn(300), torch.randn(5, 7, 64)
    exact = F.linear(x, weight, bias)
    packed = PackedLinear(weight, bias)
    out = packed(x)
    assert out.shape == exact.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    # A row alone gives bit-identical values to the same row inside a batch.
    assert torch.equal(packed(x[1:2, 3:4]), out[1:2, 3:4])
    torch.testing.assert_close(PackedLinear(weight)(x), exact - bias, rtol=1e-5, atol=1e-5)  # no bias


@pytest.mark.skipif(not hardware.detect().onednn_bf16,
                    reason="oneDNN's bf16 kernels need AVX-512 BW/VL/DQ or AVX-NE-CONVERT, which this CPU lacks")
def test_packed_linear_bf16_and_dtype_check():
    torch.manual_seed(1)
    weight, bias, x = torch.randn(40, 32), torch.randn(40), torch.randn(6, 32)
    packed = PackedLinear(weight.bfloat16(), bias.bfloat16())
    out = packed(x.bfloat16())
    assert out.dtype == torch.bfloat16
    exact = F.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16()).float()
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="bfloat16 weights, got a torch.float32 input"):
        packed(x)
    with pytest.raises(ValueError, match="2-D float32 or bfloat16 CPU weight"):
        PackedLinear(torch.ones(3, 4, dtype=torch.float64))


def test_packed_in_projection_parts():
    torch.manual_seed(2)
    projection = InProjection(16, 48)
    x = torch.randn(3, 4, 16)
    packed = InferenceInProjection(projection, PackedLinear)
    exact = projection(x)
    torch.testing.assert_close(packed(x), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.query(x), exact[..., :16], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.key_value(x), exact[..., 16:], rtol=1e-5, atol=1e-5)


def test_packed_model_matches_the_plain_model():
    torch.manual_seed(3)
    config = ModelConfig.preset("tiny", vocab_size=100, d_model=64, d_ff=128)
    model = Transformer(config).eval()
    copy = Transformer(config).eval()
    copy.load_state_dict(model.state_dict())
    packed = pack_linear_layers(copy)
    assert not any(type(m) is torch.nn.Linear or type(m) is InProjection for m in packed.modules())
    assert isinstance(packed.output_projection, PackedLinear)  # the tied projection got a packed copy
    src = torch.randint(4, 100, (3, 9))
    tgt = torch.randint(4, 100, (3, 7))
    with torch.inference_mode():
        exact, approx = model(src, tgt), packed(src, tgt)
        torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-4)
        ours = beam_search(packed, src, beam_size=3, max_len_b=8, nbest=3)
        plain = beam_search(model, src, beam_size=3, max_len_b=8, nbest=3)
    assert [[h.tokens for h in n] for n in ours] == [[h.tokens for h in n] for n in plain]
    for n_ours, n_plain in zip(ours, plain):
        torch.testing.assert_close([h.score for h in n_ours], [h.score for h in n_plain], rtol=1e-4, atol=1e-4)


def test_pack_needs_a_float_cpu_model():
    model = Transformer(ModelConfig.preset("tiny")).double()
    with pytest.raises(ValueError, match="float32 or bfloat16 model on the CPU"):
        pack_linear_layers(model)
