import math

import pytest
import torch
from torch import nn

from slt_callbacks.core.norms import squared_norm, weight_norms
from slt_callbacks.core.restrict import attention_head_components, resolve_components


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def test_total_matches_vector_norm_of_flattened_parameters():
    model = mlp()
    norms = weight_norms(model)
    assert set(norms) == {"total"}
    expected = float(torch.linalg.vector_norm(flat(model.parameters())))
    assert norms["total"] == pytest.approx(expected, rel=1e-6)


def test_buffers_are_not_weights():
    model = mlp()
    with torch.no_grad():
        model[2].running_mean.fill_(100.0)
    expected = float(torch.linalg.vector_norm(flat(model.parameters())))
    assert weight_norms(model)["total"] == pytest.approx(expected, rel=1e-6)


def test_glob_and_mask_components():
    model = mlp(torch.float64)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1:3, ::2] = True
    comps = resolve_components(
        model, {"last": "3.*", "first_rows": {"0.weight": mask, "0.bias": None}}
    )
    norms = weight_norms(model, comps)
    assert set(norms) == {"total", "last", "first_rows"}
    last = torch.linalg.vector_norm(flat([model[3].weight, model[3].bias]))
    first = torch.linalg.vector_norm(flat([model[0].weight[mask], model[0].bias]))
    assert norms["last"] == pytest.approx(float(last), rel=1e-12)
    assert norms["first_rows"] == pytest.approx(float(first), rel=1e-12)


def test_attention_head_components():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, num_heads=2)})
    comps = attention_head_components(model, "attn")
    norms = weight_norms(model, comps)
    params = dict(model.named_parameters())
    for head, resolved in comps.items():
        entries = [params[name][mask] for name, mask in resolved.items()]
        assert norms[head] == pytest.approx(float(torch.linalg.vector_norm(flat(entries))))


def test_trainable_only():
    model = mlp()
    model[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert weight_norms(model)["total"] == pytest.approx(
        float(torch.linalg.vector_norm(flat(trainable))), rel=1e-6
    )
    assert weight_norms(model, trainable_only=False)["total"] == pytest.approx(
        float(torch.linalg.vector_norm(flat(model.parameters()))), rel=1e-6
    )
    frozen_comp = {"first": {"0.weight": None}}
    assert weight_norms(model, frozen_comp, trainable_only=False)["first"] == pytest.approx(
        float(torch.linalg.vector_norm(model[0].weight.double())), rel=1e-6
    )
    with pytest.raises(ValueError, match=r"components\['first'\]"):
        weight_norms(model, frozen_comp)


def test_tied_parameters_count_once():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    expected = float(torch.linalg.vector_norm(model[0].weight.detach().double()))
    assert weight_norms(model)["total"] == pytest.approx(expected, rel=1e-6)


def test_half_precision_accumulates_in_float32():
    model = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    expected = float(torch.linalg.vector_norm(model.weight.detach().double()))
    # bf16 has 8 bits of mantissa; a bf16 accumulator would be off by far more than 1e-5.
    assert weight_norms(model)["total"] == pytest.approx(expected, rel=1e-5)
    assert squared_norm(model.weight).dtype == torch.float32


def test_squared_norm():
    t = torch.arange(6.0).reshape(2, 3)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    assert float(squared_norm(t)) == 55.0
    assert float(squared_norm(t, mask)) == 0.0 + 4.0 + 16.0
    assert squared_norm(t).shape == ()


def test_model_untouched():
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weight_norms(model, resolve_components(model, {"a": "0.*"}))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None


def test_empty_model_has_zero_norm():
    assert weight_norms(nn.ReLU()) == {"total": 0.0}


def test_values_are_python_floats():
    norms = weight_norms(mlp(), resolve_components(mlp(), {"a": "0.*"}))
    assert all(type(v) is float and math.isfinite(v) for v in norms.values())


# --- bad input ----------------------------------------------------------------------------


def test_rejects_reserved_name():
    model = mlp()
    with pytest.raises(ValueError, match="'total'"):
        weight_norms(model, {"total": {"0.weight": None}})


def test_rejects_unresolved_selector():
    with pytest.raises(ValueError, match=r"`components\['a'\]` to be resolved"):
        weight_norms(mlp(), {"a": "0.*"})


def test_rejects_bad_mask():
    model = mlp()
    with pytest.raises(ValueError, match=r"components\['a'\].*shape"):
        weight_norms(model, {"a": {"0.weight": torch.ones(3, 4, dtype=torch.bool)}})
    with pytest.raises(ValueError, match=r"components\['a'\].*bool"):
        weight_norms(model, {"a": {"0.weight": torch.ones(4, 3)}})
    with pytest.raises(ValueError, match=r"components\['a'\].*'nope'"):
        weight_norms(model, {"a": {"nope": None}})


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`components` to be a mapping"):
        weight_norms(mlp(), ["0.*"])
    with pytest.raises(ValueError, match="`trainable_only` to be a bool"):
        weight_norms(mlp(), trainable_only=1)
