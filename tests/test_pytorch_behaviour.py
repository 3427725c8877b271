"""What aiayn relies on in PyTorch itself, checked against this PyTorch (a new release may change it)."""

import pytest
import torch

from aiayn import ModelConfig, Transformer
from aiayn.inference.compile import _traced_with_settings


@pytest.mark.slow(seconds=16)
def test_compiled_step_is_not_specialised_to_a_row_count_equal_to_the_head_count():
    # With duck shaping, dynamo gives 4 decoder rows and 4 heads one symbol and specialises the
    # step to 4 rows (beam 4, one sentence); float32 linear layers of a fixed row count then go to
    # a slower MKL kernel. Traced as compile_model traces (duck shaping off), a step compiled at
    # 4 rows serves 5 rows too. Dynamo's "eager" backend: the same tracing, no kernels to build.
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", n_encoder_layers=1, n_decoder_layers=1)).eval()

    def graphs_added_by_5_rows_after_4(decode) -> int:
        def three_steps(rows: int) -> None:
            with torch.inference_mode():
                encoder_out = model.encode(torch.randint(4, 20, (rows, 5)))
                cache = model.new_cache()
                for _ in range(3):  # no cache, cache length 1, cache length 2: three graphs
                    decode(torch.full((rows, 1), 2), encoder_out, cache=cache)

        three_steps(model.config.n_heads)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        three_steps(model.config.n_heads + 1)
        return torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs

    assert model.config.n_heads == 4
    torch._dynamo.reset()  # no graphs or dynamic dimensions remembered from other tests
    plain = torch.compile(model.decode, dynamic=True, backend="eager")
    assert graphs_added_by_5_rows_after_4(plain) > 0  # the specialisation the setting avoids
    torch._dynamo.reset()
    traced = _traced_with_settings(torch.compile(model.decode, dynamic=True, backend="eager"), freeze=False)
    assert graphs_added_by_5_rows_after_4(traced) == 0
    torch._dynamo.reset()
