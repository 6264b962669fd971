"""The `vitlens` CLI and the asyncio client against the real server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitlens
from vitlens import cli


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in ("one", "two"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_explain_writes_overlays_and_json(server, images, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["explain", *map(str, images), "--server", server.address, "--out", str(out)]
    assert cli.main([*argv, "--method", "rollout", "--option", "head_fusion=max"]) == 0
    for path in images:
        overlay = Image.open(out / f"{path.stem}.png")
        assert overlay.mode == "RGB" and overlay.width >= 80
        record = json.loads((out / f"{path.stem}.json").read_text())
        assert record["method"] == "rollout" and record["model"] == "vitlens-demo"
        assert len(record["predictions"]) == 5
    assert "one.png" in capsys.readouterr().out


def test_explain_top_k_writes_one_overlay_per_class(server, images, tmp_path) -> None:
    out = tmp_path / "top"
    argv = ["explain", str(images[0]), "--server", server.address, "--out", str(out)]
    assert cli.main([*argv, "--top-k", "2"]) == 0
    assert len(list(out.glob("one_*.png"))) == 2


def test_models_and_errors(server, capsys) -> None:
    assert cli.main(["models", "--server", server.address]) == 0
    printed = capsys.readouterr().out
    assert "vitlens-demo" in printed and "tiny" in printed
    assert cli.main(["models", "--server", server.address, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["default_model"] == "vitlens-demo"
    assert {m["name"] for m in listing["models"]} == {"vitlens-demo", "tiny"}
    bad = ["explain", __file__, "--server", server.address, "--out", "/tmp/unused-vitlens"]
    assert cli.main(bad) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


async def test_async_client(server, images) -> None:
    async with vitlens.AsyncClient(server.address) as client:
        models = await client.models()
        assert {m.name for m in models} == {"vitlens-demo", "tiny"}
        result = await client.explain(images, method="generic", relevance=True)
        assert [r.heatmap.shape for r in result] == [(14, 14), (14, 14)]
        assert result[0].explanations[0].relevance.shape == (197, 197)
        classified = await client.predict(images[0], top_k=1)
        assert classified[0].predictions[0].index == result[0].top.index
        with pytest.raises(vitlens.NotFoundError):
            await client.explain(images, model="absent")
