"""Weights load from safetensors or weights-only checkpoints; nothing else is unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny import TINY_KWARGS, tiny_vit
from vitlens_server.models import ModelRegistry, ModelSpec, load_model
from vitlens_server.models.default import DEMO_LABELS, demo_spec
from vitlens_server.models.loading import ModelLoadError

ARCH = "vit_tiny_patch16_224"


def _spec(weights: Path | None, **kwargs) -> ModelSpec:
    return ModelSpec(
        name="t", architecture=ARCH, weights=weights, model_kwargs=TINY_KWARGS, **kwargs
    )


def _outputs(module: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return module(torch.randn(2, 3, 32, 32))


def test_safetensors_weights_reproduce_the_model(tmp_path: Path) -> None:
    source = tiny_vit(seed=7)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    (tmp_path / "tiny.json").write_text(json.dumps({"labels": list("abcde")}))
    loaded = load_model(_spec(path))
    torch.testing.assert_close(_outputs(loaded.module), _outputs(source))
    assert loaded.labels == tuple("abcde")
    assert not loaded.weights.random and len(loaded.weights.sha256) == 64
    assert loaded.geometry.grid == (4, 4) and loaded.geometry.num_tokens == 17


def test_fp16_safetensors_load_into_fp32(tmp_path: Path) -> None:
    source = tiny_vit(seed=8)
    path = tmp_path / "half.safetensors"
    save_file({k: v.half().contiguous() for k, v in source.state_dict().items()}, path)
    loaded = load_model(_spec(path))
    assert next(loaded.module.parameters()).dtype == torch.float32
    torch.testing.assert_close(_outputs(loaded.module), _outputs(source), atol=5e-2, rtol=5e-2)


def test_weights_only_checkpoint_with_nested_state_dict(tmp_path: Path) -> None:
    source = tiny_vit(seed=9)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    torch.testing.assert_close(_outputs(load_model(_spec(path)).module), _outputs(source))


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_code_is_refused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": _Payload()}, protocol=2))
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(_spec(path))
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    source = tiny_vit(depth=2)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    with pytest.raises(ModelLoadError, match=r"missing \[blocks\.2"):
        load_model(_spec(path))


def test_missing_file_and_unknown_architecture() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(_spec(Path("/nonexistent/w.safetensors")))
    with pytest.raises(ModelLoadError, match="unknown timm architecture"):
        load_model(ModelSpec(name="x", architecture="not_a_model"))


def test_pretrained_weights_absent_from_the_cache_fail_fast(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        load_model(_spec(None, pretrained=True))


def test_pretrained_weights_load_from_the_hugging_face_cache(tmp_path, monkeypatch) -> None:
    """A cache laid out as huggingface_hub writes it: models--org--name/{refs,snapshots}."""
    source = tiny_vit(seed=5)
    hub_id = source.pretrained_cfg["hf_hub_id"]
    repo = tmp_path / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0123abc")
    snapshot = repo / "snapshots/0123abc"
    snapshot.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, snapshot / "model.safetensors"
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    loaded = load_model(_spec(None, pretrained=True))
    assert loaded.weights.source == "timm-cache" and not loaded.weights.random
    torch.testing.assert_close(_outputs(loaded.module), _outputs(source))


def test_default_model_without_weights_reports_random_weights(tmp_path: Path) -> None:
    spec = demo_spec(weights=tmp_path / "absent.safetensors")
    model = load_model(spec)
    assert model.weights.random and model.weights.source == "random"
    assert "absent.safetensors is missing" in model.weights.metadata["note"]
    assert model.labels == DEMO_LABELS
    assert model.geometry.grid == (14, 14) and model.geometry.num_layers == 6
    again = load_model(spec)
    torch.testing.assert_close(_outputs_224(model.module), _outputs_224(again.module))


def _outputs_224(module: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return module(torch.randn(1, 3, 224, 224))


def test_registry_names_the_available_models() -> None:
    model = load_model(_spec(None))
    registry = ModelRegistry([model])
    assert registry.get("") is model
    from vitlens_server.errors import NotFound

    with pytest.raises(NotFound, match="this server has: t"):
        registry.get("missing")
    with pytest.raises(ValueError, match="two models are named"):
        ModelRegistry([model, model])
