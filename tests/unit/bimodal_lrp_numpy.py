"""LXMERT with one layer of each kind, forward and LRP written out in float64 numpy.

One item at a time, no padding, from each stream's embeddings and the model's state dict: the
forward pass keeps every sublayer's activations, `NumpyLxmert.back` walks the rules of
`explain.bimodal_lrp` down in their textbook forms (α1β0 as positive contributions
(x_j w_ij)⁺, the z-rule share by share, the skip-connection rule's rescaling spelled out).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import erf
from torch import nn

ENCODER = "lxmert.encoder"
CROSS = f"{ENCODER}.x_layers.0"
HEAD = ("answer_head.logit_fc.3", "answer_head.logit_fc.0", "lxmert.pooler.dense")
EDGE_ORDER = ("l", "r", "ti", "it", "xt", "xi")  # two_stream_graph(1, 1, 1).edges
LAYERS = {  # sublayer name → (prefix, attention, attention output, intermediate, output)
    "l": (f"{ENCODER}.layer.0", "attention.self", "attention.output", "intermediate", "output"),
    "r": (f"{ENCODER}.r_layers.0", "attention.self", "attention.output", "intermediate", "output"),
    "xt": (CROSS, "lang_self_att.self", "lang_self_att.output", "lang_inter", "lang_output"),
    "xi": (CROSS, "visn_self_att.self", "visn_self_att.output", "visn_inter", "visn_output"),
}


def div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / z with the rules' signed ε (z + ε·sign(z)); 0 where z = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, 0.0, num / (den + 1e-9 * np.sign(den)))


def alpha_beta(x: np.ndarray, w: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """α1β0 per token, x (N, I), w (O, I), rel (N, O) → (N, I):
    R_j = Σ_i (x_j w_ij)⁺ / Σ_j' (x_j' w_ij')⁺ · R_i."""
    pos = np.maximum(x[:, None, :] * w[None], 0)  # (N, O, I)
    return np.einsum("noi,no->ni", pos, div(rel, pos.sum(-1)))


def product(a: np.ndarray, b: np.ndarray, rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-rule for z = a b, a (I, K), b (K, J), rel (I, J): each operand's share halved."""
    share = a[:, :, None] * b[None] * div(rel, a @ b)[:, None, :]  # (I, K, J)
    return share.sum(2) / 2, share.sum(0) / 2


def residual(x: np.ndarray, f: np.ndarray, rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z = x + f: z-rule shares, each rescaled to |Σ R_x| / (|Σ R_x| + |Σ R_f|) of Σ R."""
    rx, rf = x * div(rel, x + f), f * div(rel, x + f)
    sx, sf, total = rx.sum(), rf.sum(), rel.sum()
    both = abs(sx) + abs(sf)
    return rx * div(div(abs(sx), both) * total, sx), rf * div(div(abs(sf), both) * total, sf)


def _gelu(x: np.ndarray) -> np.ndarray:
    return x * 0.5 * (1 + erf(x / np.sqrt(2)))


class NumpyLxmert:
    """The forward pass (keeping activations) and the LRP walk of one item."""

    def __init__(self, module: nn.Module) -> None:
        self.state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
        self.heads = int(module.config.num_attention_heads)
        self.acts: dict[str, dict] = {}
        self.found: dict[str, np.ndarray] = {}

    def w(self, path: str) -> np.ndarray:
        return self.state[f"{path}.weight"]

    def lin(self, x: np.ndarray, path: str) -> np.ndarray:
        return x @ self.w(path).T + self.state[f"{path}.bias"]

    def ln(self, x: np.ndarray, path: str) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * self.w(path) + self.state[f"{path}.bias"]

    # --- forward ----------------------------------------------------------------------

    def attention(self, name: str, att: str, out: str, x: np.ndarray, ctx: np.ndarray):
        """LN(x + dense(softmax(QKᵀ/√d) V)), Q from x, K and V from ctx; heads explicit."""
        q, k, v = (
            self.lin(x, f"{att}.query"),
            self.lin(ctx, f"{att}.key"),
            self.lin(ctx, f"{att}.value"),
        )
        d = q.shape[-1] // self.heads
        qh, kh, vh = (t.reshape(len(t), self.heads, d).transpose(1, 0, 2) for t in (q, k, v))
        scores = qh @ kh.transpose(0, 2, 1) / np.sqrt(d)  # (h, q, k)
        a = np.exp(scores - scores.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        mixed = (a @ vh).transpose(1, 0, 2).reshape(len(x), -1)
        branch = self.lin(mixed, f"{out}.dense")
        self.acts[name] = {
            "x": x,
            "ctx": ctx,
            "q": qh / np.sqrt(d),
            "k": kh,
            "v": vh,
            "a": a,
            "mixed": mixed,
            "branch": branch,
            "att": att,
            "out": out,
        }
        return self.ln(x + branch, f"{out}.LayerNorm")

    def layer(self, name: str, x: np.ndarray) -> np.ndarray:
        """A self-attention layer of ``LAYERS``, then its FFN: LN(h + fc2(gelu(fc1(h))))."""
        prefix, att, att_out, inter, out = LAYERS[name]
        h = self.attention(name, f"{prefix}.{att}", f"{prefix}.{att_out}", x, x)
        hidden = _gelu(self.lin(h, f"{prefix}.{inter}.dense"))
        branch = self.lin(hidden, f"{prefix}.{out}.dense")
        self.acts[f"{name}.ffn"] = {
            "h": h,
            "hidden": hidden,
            "branch": branch,
            "fc1": f"{prefix}.{inter}.dense",
            "fc2": f"{prefix}.{out}.dense",
        }
        return self.ln(h + branch, f"{prefix}.{out}.LayerNorm")

    def forward(self, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Embeddings (T, D) and (R, D) → the answer logits (A,)."""
        text, image = self.layer("l", text), self.layer("r", image)
        cross = (f"{CROSS}.visual_attention.att", f"{CROSS}.visual_attention.output")
        text, image = (
            self.attention("ti", *cross, text, image),  # both from the layer's inputs
            self.attention("it", *cross, image, text),
        )
        text, image = self.layer("xt", text), self.layer("xi", image)
        self.head_in = [text[0]]  # the inputs of HEAD, filled from the bottom
        self.head_in.insert(0, np.tanh(self.lin(self.head_in[0], HEAD[2])))
        self.head_in.insert(
            0, self.ln(_gelu(self.lin(self.head_in[0], HEAD[1])), "answer_head.logit_fc.2")
        )
        return self.lin(self.head_in[0], HEAD[0])

    # --- LRP --------------------------------------------------------------------------

    def back_attention(self, name: str, rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """R at the sublayer output → (at the query stream, at the key stream)."""
        a = self.acts[name]
        skip, branch = residual(a["x"], a["branch"], rel)
        mixed = alpha_beta(a["mixed"], self.w(f"{a['out']}.dense"), branch)
        mixed = mixed.reshape(len(mixed), self.heads, -1)
        rel_a, rel_q, rel_k, rel_v = [], [], [], []
        for h in range(self.heads):
            ra, rv = product(a["a"][h], a["v"][h], mixed[:, h])
            rq, rkt = product(a["q"][h], a["k"][h].T, ra)
            rel_a.append(ra), rel_q.append(rq), rel_k.append(rkt.T), rel_v.append(rv)
        self.found[name] = np.stack(rel_a)  # (h, q, k)
        cat: Callable[[list], np.ndarray] = lambda parts: np.concatenate(parts, axis=-1)  # noqa: E731
        query = alpha_beta(a["x"], self.w(f"{a['att']}.query"), cat(rel_q))
        kv = alpha_beta(a["ctx"], self.w(f"{a['att']}.key"), cat(rel_k))
        kv = kv + alpha_beta(a["ctx"], self.w(f"{a['att']}.value"), cat(rel_v))
        return skip + query, kv

    def back_layer(self, name: str, rel: np.ndarray) -> np.ndarray:
        a = self.acts[f"{name}.ffn"]
        skip, branch = residual(a["h"], a["branch"], rel)
        hidden = alpha_beta(a["hidden"], self.w(a["fc2"]), branch)
        mid = skip + alpha_beta(a["h"], self.w(a["fc1"]), hidden)
        return sum(self.back_attention(name, mid))

    def back(self, target: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """From e_target at the logits: (R^A in edge order, R at the text and image embeddings)."""
        rel = np.eye(len(self.w(HEAD[0])))[target]
        for path, x in zip(HEAD, self.head_in, strict=True):
            rel = alpha_beta(x[None], self.w(path), rel[None])[0]
        text = np.zeros((len(self.acts["xt"]["x"]), len(rel)))
        text[0] = rel
        image = np.zeros((len(self.acts["xi"]["x"]), len(rel)))  # the answer reads no image
        text, image = self.back_layer("xt", text), self.back_layer("xi", image)
        text_q, image_kv = self.back_attention("ti", text)
        image_q, text_kv = self.back_attention("it", image)
        image = self.back_layer("r", image_q + image_kv)
        text = self.back_layer("l", text_q + text_kv)
        return [self.found[n] for n in EDGE_ORDER], text, image
