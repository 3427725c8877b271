"""Pre-packed linear layers for CPU inference in float32 and bfloat16 (oneDNN).

On the CPU, `F.linear` in float32 calls MKL's sgemm on the weight in its plain [out, in] layout
at every call. Decoding multiplies few rows at a time (one per beam: 4 rows per step at batch 1),
and there MKL runs far below the machine's peak. oneDNN (`torch.ops.mkldnn._linear_pointwise`,
the kernel `torch.compile` uses for frozen linear layers) with the weight reordered once into its
blocked layout does better on large layers (an output projection over the vocabulary), though
each call costs about 10 us whatever its size (benchmarks/RESULTS.md has the measurements).

oneDNN also computes each row the same way whatever the other rows (MKL does not: up to 5e-5
differences between a row alone and in a batch), so a batch of N sentences translates exactly as
N single sentences. Packed layers serve inference only: the weights are an opaque oneDNN tensor,
not a parameter (no gradients, no state dict, no `.to()`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aiayn.inference.layers import replace_linear_layers


def available() -> bool:
    """True where this PyTorch build has oneDNN and its packed linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """y = x W^T + b with W reordered once into oneDNN's layout (same dtype as W: fp32 or bf16).

    Args:
        weight: [out, in] on the CPU, float32 or bfloat16; bias: [out] or None.
    Raises:
        ValueError: the weight is not a 2-D float32 / bfloat16 CPU tensor, or oneDNN is missing.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if not available():
            raise ValueError("packed linear layers need a PyTorch build with oneDNN (mkldnn)")
        if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"PackedLinear needs a 2-D float32 or bfloat16 CPU weight, got {weight.dtype} "
                f"{tuple(weight.shape)} on {weight.device}"
            )
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        # A plain attribute, not a buffer: state_dict / .to() / deepcopy cannot handle oneDNN tensors.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(weight.dtype).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] -> [..., out], in the weight's dtype."""
        if x.dtype != self.dtype:
            raise ValueError(f"PackedLinear holds {self.dtype} weights, got a {x.dtype} input")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed {self.dtype}"


def pack_linear_layers(model: nn.Module) -> nn.Module:
    """Replace, in place, every linear layer of a CPU `Transformer` by a `PackedLinear`.

    Raises:
        ValueError: the model is not float32 / bfloat16 on the CPU, or oneDNN is missing.
    """
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"packing needs a float32 or bfloat16 model on the CPU, got {first.dtype} on {first.device}")
    return replace_linear_layers(model, PackedLinear)  # PackedLinear raises if oneDNN is missing
