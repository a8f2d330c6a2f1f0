"""``--compile``: the forward compiled in place keeps the parameters and checkpoint layout."""

from __future__ import annotations

import torch

from utils.runtime import compiled


def test_compiled_in_place_keeps_state_dict_and_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    keys, x = list(model.state_dict()), torch.randn(3, 4)
    eager = model(x)
    assert compiled(model, enabled=False) is model
    assert compiled(model) is model
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints load as before
    torch.testing.assert_close(model(x), eager, atol=1e-6, rtol=1e-5)
