"""Hypothesis strategies for the fuzz suite: mostly valid vitlens requests with hostile mutations.

Each request strategy first draws which of its fields may be hostile — none, exactly one, or
all of them (`Mutations`) — then draws every field from its valid strategy, the mutated one
from its hostile strategy, or, when all may be, each from either. So about a third of the
requests are valid, a third carry one mutation, and Hypothesis shrinks a failing example to
the one field that matters. `single_images` feeds the image decoders one image at a time.

What is valid comes from the server's registries (method parameters, metric options) and the
test model (`Catalog`); hostile means unknown names, 100 kB strings, NaN and ±Inf, raw enum
integers, tensors whose bytes and shape disagree, truncated or lying PNGs, paths with ``..``
or NUL, and so on.

Requests come wrapped in `Shown`, whose repr (what Hypothesis prints for a failing example) is
`describe`'s: long strings and bytes cut, long lists summarised.
"""

from tests.rpc.fuzz.basics import (
    Catalog,
    Mutations,
    Param,
    Shown,
    deadlines_s,
    describe,
    hostile_strings,
    model_names,
    server_catalog,
)
from tests.rpc.fuzz.images import images, single_images
from tests.rpc.fuzz.raw import raw_payloads
from tests.rpc.fuzz.requests import evaluate_requests, explain_requests, predict_requests

__all__ = [
    "Catalog",
    "Mutations",
    "Param",
    "Shown",
    "deadlines_s",
    "describe",
    "evaluate_requests",
    "explain_requests",
    "hostile_strings",
    "images",
    "model_names",
    "predict_requests",
    "raw_payloads",
    "server_catalog",
    "single_images",
]
