"""The reference rows: `random` (seeded uniform noise) and `oracle` (the ground-truth mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tests.tiny import tiny_loaded
from vitlens_server.errors import InvalidArgument
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.methods.reference import oracle_map
from vitlens_server.explain.params import parse_params
from vitlens_server.explain.records import AttentionRecord, Recording
from vitlens_server.rpc.convert import model_info
from vitlens_server.runtime.cards import model_card

M32 = 0xFFFFFFFF


def _lowbias32(x: int) -> int:
    """The documented hash on Python integers (no overflow to worry about)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _image_key(pixels: np.ndarray) -> int:
    """c = Σ_p h(p · 256 + v[p]) mod 2³² over the image's 0..255 values in C, H, W order."""
    values = np.rint(pixels.ravel().astype(np.float32) * np.float32(255)).astype(int)
    return sum(_lowbias32(((p << 8) + int(v)) & M32) for p, v in enumerate(values)) & M32


def _reference(seed: int, image: int, patches: int) -> np.ndarray:
    keys = [_lowbias32(_lowbias32(_lowbias32(seed) ^ image) ^ j) for j in range(patches)]
    return np.array([(k >> 8) / 2**24 for k in keys])


@pytest.fixture(scope="module")
def explainer() -> Explainer:
    return Explainer(tiny_loaded(seed=2))


def _explain(explainer: Explainer, x: torch.Tensor, target=None, **options) -> np.ndarray:
    target = target or TargetSpec()
    spec = get_method("random")
    params = parse_params(spec.params, options, method="random")
    explainer.check(spec, params, target)
    return explainer.explain(ExplainJob(x, spec, params, target)).heatmaps  # (B, K, gh, gw)


@pytest.mark.parametrize("seed", [0, 7, M32])
def test_random_is_the_documented_hash_of_seed_image_and_patch(explainer, seed: int) -> None:
    x = torch.rand(3, 3, 32, 32)
    maps = _explain(explainer, x, seed=seed)
    assert maps.shape == (3, 1, 4, 4) and maps.dtype == np.float32
    for b in range(3):
        key = _image_key(x[b].numpy())
        np.testing.assert_array_equal(maps[b, 0].ravel(), _reference(seed, key, 16))


def test_random_depends_on_seed_and_image_content_only(explainer) -> None:
    x = torch.rand(3, 3, 32, 32)
    first = _explain(explainer, x, seed=3)
    np.testing.assert_array_equal(_explain(explainer, x, seed=3), first)  # same request
    assert not np.allclose(_explain(explainer, x, seed=4), first)
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[1], first[2])
    shuffled = _explain(explainer, x[[2, 0, 1]], seed=3)  # place in the batch does not matter
    np.testing.assert_array_equal(shuffled, first[[2, 0, 1]])
    np.testing.assert_array_equal(_explain(explainer, x[1:2], seed=3)[0], first[1])
    same = _explain(explainer, x[:1].expand(2, -1, -1, -1), seed=3)  # same image, same map
    np.testing.assert_array_equal(same[0], same[1])
    nudged = x.clone()
    nudged[0, 1, 5, 7] += 1 / 255  # one pixel one level brighter: independent noise
    assert not np.allclose(_explain(explainer, nudged, seed=3)[0], first[0])
    two = _explain(explainer, x, TargetSpec("top_k", k=2), seed=3)  # one map for every class
    np.testing.assert_array_equal(two[:, 0], first[:, 0])
    np.testing.assert_array_equal(two[:, 1], first[:, 0])


def _recording(batch: int, grid: tuple[int, int], dtype: torch.dtype) -> Recording:
    """Just what `random` reads: pixels, the dtype and device of q, and the grid."""
    q = torch.zeros(batch, 1, 1, 1, dtype=dtype)
    pixels = torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return Recording(
        [AttentionRecord(q=q)], num_heads=1, num_prefix_tokens=0, grid=grid, pixels=pixels
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_random_is_uniform_on_zero_one_in_every_dtype(dtype: torch.dtype) -> None:
    spec = get_method("random")
    params = parse_params(spec.params, {}, method="random")
    maps = spec.fn(_recording(2, (128, 96), dtype), torch.zeros(2, dtype=torch.long), params)
    noise = maps.heatmap
    assert noise.shape == (2, 128, 96) and noise.dtype == dtype
    assert noise.min() >= 0 and noise.max() < 1
    values = noise.double().flatten(1).numpy()
    for image in values:
        assert stats.kstest(image, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(values[0], values[1])[0, 1]) < 0.05  # images are independent
    assert abs(np.corrcoef(values[0][:-1], values[0][1:])[0, 1]) < 0.05  # so are neighbours


def test_random_seed_must_be_a_32_bit_unsigned_integer() -> None:
    spec = get_method("random")
    for bad in (-1, M32 + 1, 1.5, "1"):
        with pytest.raises(InvalidArgument, match=r"random\.seed"):
            parse_params(spec.params, {"seed": bad}, method="random")


def test_random_and_oracle_flags() -> None:
    rand, oracle = get_method("random"), get_method("oracle")
    assert not rand.class_specific and rand.readouts is None and not rand.needs_mask
    assert rand.pass_names == ["forward"]
    assert oracle.needs_mask and oracle.class_specific and oracle.readouts is None


def test_explain_refuses_oracle_and_points_to_evaluate(explainer) -> None:
    spec = get_method("oracle")
    params = parse_params(spec.params, {}, method="oracle")
    with pytest.raises(InvalidArgument, match="available only in Evaluate"):
        explainer.check(spec, params, TargetSpec())
    with pytest.raises(InvalidArgument, match="available only in Evaluate"):
        explainer.explain(ExplainJob(torch.rand(1, 3, 32, 32), spec, params, TargetSpec()))


def test_model_info_lists_random_but_not_oracle() -> None:
    explainer = Explainer(tiny_loaded(seed=2))
    card = model_card(explainer.model, explainer.supported_methods())
    names = {m.name for m in model_info(card).methods}
    assert {"random", "isaw"} <= names and "oracle" not in names


def test_oracle_map_turns_masks_into_float_maps() -> None:
    masks = torch.zeros(2, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    out = oracle_map(masks)
    assert out.shape == (2, 5, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out, masks.float())
    as_uint8 = masks.to(torch.uint8) * 255  # Sample.mask: uint8, nonzero = object
    torch.testing.assert_close(oracle_map(as_uint8), masks.float())
    soft = torch.rand(2, 5, 7, dtype=torch.float64)
    assert oracle_map(soft) is soft
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        oracle_map(masks[0])
