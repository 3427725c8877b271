"""Converting a `Transformer`'s linear layers for inference (oneDNN-packed in `prepack`, int8 in
`quantize`): one generic replacement, shared by both."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from aiayn.model.attention import InProjection


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
