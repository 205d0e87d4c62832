"""The prune step's Spec: bad values are refused with one line naming the field."""

from __future__ import annotations

import pytest

from mnnpipe.errors import SpecError
from mnnpipe.runner import parse_spec

BASE = {
    "output": "/tmp/out",
    "model": {"uri": "m.pth", "factory": "mnnpipe.models:digits_cnn"},
    "input": {"shape": [1, 1, 8, 8]},
}


def spec(**changes):
    return parse_spec("prune", {**BASE, **changes})


def test_defaults_prune_30_percent_of_channels_by_l1():
    s = spec()

    assert (s.method, s.importance, s.target.by, s.target.ratio, s.iterative_steps) == ("structured", "l1", "channels", 0.3, 1)


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_channel_ratio_out_of_range(ratio):
    with pytest.raises(SpecError, match=r"^target.ratio: ratio must be in \(0, 1\)"):
        spec(target={"ratio": ratio})


@pytest.mark.parametrize("sparsity", [0, 1, 2])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(SpecError, match=r"^sparsity: sparsity must be in \(0, 1\)"):
        spec(method="unstructured", sparsity=sparsity)


def test_target_needs_exactly_one_amount():
    with pytest.raises(SpecError, match="exactly one of ratio or count"):
        spec(target={"by": "params", "ratio": 0.5, "count": 1000})


def test_count_is_for_params_or_macs_only():
    with pytest.raises(SpecError, match="count applies to by 'params' or 'macs'"):
        spec(target={"by": "channels", "count": 1000})


@pytest.mark.parametrize(("fmt", "uri", "why"), [("torchscript", "m.pt", "TorchScript"), ("torch-export", "m.pt2", "refuses .eval")])
def test_non_module_formats_are_refused_with_what_to_pass_instead(fmt, uri, why):
    with pytest.raises(SpecError, match=rf"^model: format '{fmt}' cannot be pruned: .*{why}.*name the architecture with `factory`"):
        spec(model={"uri": uri})
    assert spec(model={"uri": uri, "factory": "mnnpipe.models:digits_cnn"}).model.format == fmt  # weights into that class


def test_data_driven_importance_needs_data():
    with pytest.raises(SpecError, match="importance 'activation' needs data"):
        spec(importance="activation")


def test_input_or_a_dataset_is_required():
    data = {k: v for k, v in BASE.items() if k != "input"}

    with pytest.raises(SpecError, match="input is required"):
        parse_spec("prune", data)


def test_accuracy_budget_needs_eval_data():
    with pytest.raises(SpecError, match="max_accuracy_drop needs `evaluation`"):
        spec(max_accuracy_drop=1.0)


def test_unknown_field_is_refused():
    with pytest.raises(SpecError, match="^ratio: unknown field"):
        spec(ratio=0.5)


def test_importance_criteria_match_the_spec_literal():
    from typing import get_args

    from mnnpipe.importance import CRITERIA
    from mnnpipe.steps.prune import Importance

    assert set(CRITERIA) == set(get_args(Importance))


def test_activation_importance_removes_the_silent_neuron_that_l1_keeps():
    import torch
    import torch_pruning as tp

    from mnnpipe.importance import CRITERIA

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor([[9.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]))
            net[0].bias.zero_()
        return net

    x = torch.rand(16, 4)
    x[:, 0] = 0  # neuron 0 reads only feature 0: biggest weights, zero output
    kept = {}
    for name in ("l1", "activation"):
        net, criterion = model(), CRITERIA[name]
        importance = criterion.make()
        criterion.prepare(net, [(x, None)], importance)
        pruner = tp.pruner.MetaPruner(net, x[:1], importance=importance, pruning_ratio=1 / 3, ignored_layers=[net[2]])

        pruner.step()

        kept[name] = net[0].weight[:, 0].abs().max().item()  # 9 if neuron 0 survived
    assert kept == {"l1": 9.0, "activation": 0.0}
