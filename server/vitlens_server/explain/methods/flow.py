"""Attention flow (Abnar & Zuidema 2020): maximum flow through the layered attention graph.

Nodes (l, i), l = 0..L, i = 0..N-1; the edge (l-1, j) → (l, i) has capacity Ã_l[i, j] with

    Ã_l = norm_rows(fuse_h(A_l) + I)                       (B, N, N), as in `rollout`
    map[j] = maxflow((0, P+j) → (L, r))                    j = 0..gh·gw-1

r is the class token's row. For DeiT distilled the classifier reads rows 0 and 1, so the sink is a
super-sink fed by (L, 0) and (L, 1) through edges of infinite capacity (the flow may reach either
readout token; values then lie in [0, 2] instead of [0, 1]). Average-pooled models are refused: a
super-sink fed by every patch token of layer L bounds the flow only by the source's own edges,
which is not the question the paper asks.

Where the paper's code differs: Abnar & Zuidema compute the flow from each output node down to
each input node (the same graph with every edge reversed, hence the same values) and then divide
each node's flows by their sum; vitlens returns the raw max-flow values (a positive rescaling per
image, which the map's display normalisation undoes). ``start_layer`` restricts the graph to
blocks start_layer..L-1 exactly as it restricts rollout's product, so the sources are the tokens
entering block ``start_layer``.

Ã is built batched on the model's device; the graph search is CPU work by definition (one host
copy of (B, L, N, N) float64), done by the compiled solver in `vitlens_server.explain.maxflow`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitlens_server.errors import InvalidArgument
from vitlens_server.explain.methods.attention import RolloutParams, augmented_attention
from vitlens_server.explain.records import Recording
from vitlens_server.explain.registry import MethodOutput, Pass, register_method

__all__ = ["FlowParams", "attention_flow", "flow_capacities"]


@dataclass(frozen=True)
class FlowParams(RolloutParams):
    """Rollout's options: head fusion, discard ratio and first block of the graph."""

    def check(self, num_layers: int) -> None:
        if self.start_layer >= num_layers:
            raise InvalidArgument(
                f"attention_flow.start_layer must be below the model's {num_layers} layers; "
                f"got {self.start_layer}"
            )


def flow_capacities(rec: Recording, params: FlowParams) -> Tensor:
    """Ã_l = norm_rows(fuse_h(A_l) + I) for l = start_layer..L-1, as (B, L', N, N) float64."""
    # float64: the capacities' row sums are 1 to 1e-16, not float32's 1e-7
    layers = [
        augmented_attention(rec, layer, params, torch.float64)
        for layer in range(params.start_layer, rec.num_layers)
    ]
    return torch.stack(layers, dim=1)


@register_method(
    "attention_flow",
    passes=Pass.FORWARD,
    class_specific=False,
    readouts=("token", "distilled"),
    params=FlowParams,
    host_bound=True,
    description="Attention flow (Abnar & Zuidema 2020): maximum flow from each patch token "
    "through the head-fused, identity-augmented attention graph to the class token, solved "
    "exactly on CPU.",
)
def attention_flow(rec: Recording, _targets: Tensor, params: FlowParams) -> MethodOutput:
    """map[j] = maxflow((0, P+j) → (L, R)) over capacities Ã_l[i, j], (B, gh, gw)."""
    from vitlens_server.explain import maxflow  # numba loads on first use, not at registration

    capacity = flow_capacities(rec, params)  # (B, L', N, N)
    n = capacity.shape[-1]
    sinks = torch.nonzero(rec.readout[: rec.num_prefix_tokens] > 0).flatten()  # readout rows
    host = capacity.cpu().numpy()
    values = maxflow.max_flow_values(
        host, torch.arange(rec.num_prefix_tokens, n).numpy(), sinks.cpu().numpy()
    )  # (B, gh·gw)
    dtype = rec.layers[0].q.dtype
    heatmap = torch.from_numpy(values).to(device=capacity.device, dtype=dtype)
    return MethodOutput(heatmap.reshape(capacity.shape[0], *rec.grid))
