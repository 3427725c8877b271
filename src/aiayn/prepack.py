"""Pre-packed linear layers for CPU inference in float32 and bfloat16 (oneDNN).

On the CPU, `F.linear` in float32 calls MKL's sgemm on the weight in its plain [out, in] layout
at every call. Decoding multiplies few rows at a time (one per beam: 4 rows per step at batch 1),
and there MKL runs far below the machine's peak. oneDNN (`torch.ops.mkldnn._linear_pointwise`,
the kernel `torch.compile` uses for frozen linear layers) with the weight reordered once into its
blocked layout does better. Measured on the 2-core AMD EPYC (AVX-512), 1 thread, [M, 256] x
[256, 8000] (the `small` preset's output projection): 497 -> 190 us at M = 4, 6.6 -> 4.8 ms at
M = 128; the decoder's [256, 768 / 1024] layers 1.1-1.9x. bf16 weights packed the same way:
210 -> 109 us at M = 4.

oneDNN also computes each row the same way whatever the other rows (MKL does not: up to 5e-5
differences between a row alone and in a batch), so a batch of N sentences translates exactly as
N single sentences. Packed layers serve inference only: the weights are an opaque oneDNN tensor,
not a parameter (no gradients, no state dict, no `.to()`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from aiayn.attention import InProjection


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


class InferenceInProjection(nn.Module):
    """An `InProjection` converted for inference: the whole [3E, E] matrix, and its q and k | v
    parts converted apart by `make_linear(weight, bias)` (packed here, int8 in `aiayn.quantize`)."""

    def __init__(self, projection: InProjection, make_linear: Callable[[Tensor, Tensor | None], nn.Module]) -> None:
        super().__init__()
        d = projection.in_features
        weight, bias = projection.weight, projection.bias
        self.all = make_linear(weight, bias)
        self.q = make_linear(weight[:d], None if bias is None else bias[:d])
        self.kv = make_linear(weight[d:], None if bias is None else bias[d:])

    def forward(self, x: Tensor) -> Tensor:
        return self.all(x)

    def query(self, x: Tensor) -> Tensor:
        return self.q(x)

    def key_value(self, x: Tensor) -> Tensor:
        return self.kv(x)


def replace_linear_layers(model: nn.Module, make_linear: Callable[[Tensor, Tensor | None], nn.Module]) -> nn.Module:
    """Replace, in place, every linear layer of a `Transformer` by `make_linear(weight, bias)`.

    The tied pre-softmax projection (section 3.4) gets its own converted copy of the embedding
    matrix; the embedding lookups keep the plain one. The model can only run inference afterwards.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, InProjection):
                setattr(module, name, InferenceInProjection(child, make_linear))
            elif isinstance(child, nn.Linear):
                setattr(module, name, make_linear(child.weight, child.bias))
    if model.output_projection is None:  # tied: logits() uses output_projection when it is set
        model.output_projection = make_linear(model.src_embedding.weight, None)
    return model.eval()


def pack_linear_layers(model: nn.Module) -> nn.Module:
    """Replace, in place, every linear layer of a CPU `Transformer` by a `PackedLinear`.

    Raises:
        ValueError: the model is not float32 / bfloat16 on the CPU, or oneDNN is missing.
    """
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"packing needs a float32 or bfloat16 model on the CPU, got {first.dtype} on {first.device}")
    return replace_linear_layers(model, PackedLinear)  # PackedLinear raises if oneDNN is missing
