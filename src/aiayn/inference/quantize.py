"""Int8 inference on CPU: every linear layer in integer arithmetic, scales per row.

Each weight matrix is stored as int8 with one scale per output row (symmetric: max |w| -> 127).
At every call each input row (one token) is quantised to int8 with its own scale, the product
runs as int8 x int8 -> int32 (`torch._int_mm`: oneDNN, AVX-512 VNNI where the CPU has it), and
the int32 result is scaled back to float32: y = (x_q W_q^T) * s_x * s_w + b. Embedding lookups,
LayerNorm, softmax and the attention products Q K^T and A V stay in float32.

Scales per input row (as CTranslate2 does), not one per batch (as
`torch.ao.quantization.quantize_dynamic` does): a token's output never depends on the other
sentences in its batch, so a batch of N translates exactly as N single sentences, and a row is
quantised to its own range (8 bits, no reduced range).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aiayn.inference.layers import replace_linear_layers


def _symmetric_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of x [N, K] -> (int8 values [N, K], float32 scales [N, 1]) with x ~ values * scales."""
    scales = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(127.0)  # [N, 1]
    return torch.div(x, scales).round_().to(torch.int8), scales


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 and x quantised per row at each call (float32 in and out).

    Args:
        weight: [out, in] float weight to quantise; bias: [out] or None.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        values, scales = _symmetric_int8(weight.detach().float())
        self.out_features, self.in_features = values.shape
        self.register_buffer("weight_t", values.t().contiguous())  # [in, out] int8
        self.register_buffer("weight_scale", scales.view(-1))  # [out]
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # [N, in]
        x_q, x_scale = _symmetric_int8(rows)
        y = torch._int_mm(x_q, self.weight_t).float()  # [N, out], exact integer dot products
        y.mul_(self.weight_scale).mul_(x_scale)  # in place: the output is the largest tensor here
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every linear layer of a float32 CPU `Transformer` by its int8 version.

    The tied pre-softmax projection (section 3.4) gets an int8 copy of the embedding matrix; the
    embedding lookups keep the float32 matrix. The model can only run inference afterwards.
    Raises:
        ValueError: the model is not float32 on the CPU.
    """
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != torch.float32:
        raise ValueError(f"int8 needs a float32 model on the CPU, got {first.dtype} on {first.device}")
    return replace_linear_layers(model, Int8Linear)
