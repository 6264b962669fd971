"""Method options are parsed strictly, with messages naming what is valid."""

from __future__ import annotations

import pytest

from vitlens_server.errors import InvalidArgument
from vitlens_server.explain.methods.attention import RolloutParams
from vitlens_server.explain.params import NoParams, describe_params, parse_params


def test_struct_numbers_become_ints_and_floats() -> None:
    params = parse_params(RolloutParams, {"start_layer": 2.0, "discard_ratio": 0}, method="rollout")
    assert params == RolloutParams(start_layer=2, discard_ratio=0.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nope": 1}, "has no option 'nope'; valid: head_fusion, discard_ratio, start_layer"),
        ({"head_fusion": "median"}, "must be one of mean, max, min"),
        ({"discard_ratio": 1.5}, r"must lie in \[0.0, 0.99\]"),
        ({"start_layer": 1.5}, "must be a int"),
        ({"start_layer": True}, "must be a int"),
        ({"head_fusion": 3}, "must be a str"),
    ],
)
def test_bad_options_are_explained(options, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_params(RolloutParams, options, method="rollout")


def test_methods_without_options_reject_any() -> None:
    with pytest.raises(InvalidArgument, match="valid: none"):
        parse_params(NoParams, {"x": 1}, method="generic")


def test_descriptions_list_types_defaults_and_choices() -> None:
    info = {p.name: p for p in describe_params(RolloutParams)}
    assert info["head_fusion"].choices == ("mean", "max", "min")
    assert info["discard_ratio"].type == "float" and info["discard_ratio"].default_json == "0.0"
    assert info["start_layer"].type == "int"
