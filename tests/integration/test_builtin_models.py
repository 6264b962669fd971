"""The models that ship with the server, servable by name: ``--model vitlens-clip`` (flag, TOML
config, VITLENS_MODEL) resolves to the exemplar CLIP in assets/vitlens-clip/, which loads, serves
as an image-text model with its labels, and explains through the CLI; the default model list
stays vitlens-demo alone; a missing asset file is an error naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import vitlens
from tests.conftest import start_server
from vitlens import cli
from vitlens_server import cli as serve_cli
from vitlens_server.config import ServerConfig
from vitlens_server.models import ModelRegistry, load_model
from vitlens_server.models import default as builtin
from vitlens_server.settings import parse_settings

SHIPPED = Path(builtin.__file__).resolve().parents[1] / "assets" / "vitlens-clip"


def config_of(argv: list[str], environ: dict[str, str] | None = None) -> ServerConfig:
    args = parse_settings(serve_cli.build_parser(), argv, environ or {})
    return serve_cli.config_from_args(args)


def test_the_name_resolves_to_the_shipped_folder_from_flags_file_and_environment(
    tmp_path: Path,
) -> None:
    toml = tmp_path / "vitlens.toml"
    toml.write_text('model = ["vitlens-demo", "vitlens-clip"]\n')
    for config in (
        config_of(["--model", "vitlens-demo", "--model", "vitlens-clip"]),
        config_of(["--config", str(toml)]),
        config_of([], {"VITLENS_MODEL": "vitlens-demo,vitlens-clip"}),
    ):
        demo, clip = config.models
        assert demo.name == "vitlens-demo" and not demo.image_text
        assert clip.name == "vitlens-clip" and clip.image_text
        assert clip.source == f"open_clip:{SHIPPED}"
        assert clip.prompt_template is None  # the folder's vitlens.json gives it


def test_the_default_model_list_is_still_the_demo_alone() -> None:
    assert [m.name for m in config_of([]).models] == ["vitlens-demo"]
    assert [m.name for m in ServerConfig().models] == ["vitlens-demo"]
    assert "'vitlens-clip'" in serve_cli.build_parser().format_help()


def test_a_missing_asset_file_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    partial = tmp_path / "vitlens-clip"
    partial.mkdir()
    for name in ("open_clip_config.json", "vitlens.json"):
        shutil.copy2(SHIPPED / name, partial / name)
    missing = partial / "open_clip_model.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        builtin.clip_spec("cpu", partial)
    monkeypatch.setitem(
        builtin.BUILTIN_MODELS, "vitlens-clip", lambda device: builtin.clip_spec(device, partial)
    )
    assert serve_cli.main(["--model", "vitlens-clip", "--port", "0"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_the_exemplar_serves_as_an_image_text_model_with_its_labels(tmp_path: Path, capsys) -> None:
    labels = tuple(json.loads((SHIPPED / "vitlens.json").read_text())["labels"])
    (spec,) = config_of(["--model", "vitlens-clip"]).models
    running, stop = start_server(ServerConfig(port=0), ModelRegistry([load_model(spec)]))
    try:
        with vitlens.Client(running.address, timeout_s=120) as client:
            info = client.model("vitlens-clip")
            assert info.task == "image_text_similarity" and info.image_text
            assert info.labels == labels
            assert set(info.modalities) == {"image", "text"}
            assert info.prompt_template.count("{}") == 1
        assert cli.main(["models", "--server", running.address]) == 0
        (row,) = (r for r in capsys.readouterr().out.splitlines() if r.startswith("vitlens-clip"))
        assert row.split()[1:3] == ["*", "image-text"]  # the only model: the default
        scene = Path(__file__).resolve().parents[2] / "examples/grpcurl/scene.png"
        out = tmp_path / "out"
        argv = ["explain", str(scene), "--server", running.address, "--out", str(out)]
        assert (
            cli.main([*argv, "--text", "a photo of a disc.", "--text", "a photo of a star."]) == 0
        )
        assert len(list(out.glob("scene_*_tokens.png"))) == 2
    finally:
        stop()
    assert "logit" in capsys.readouterr().out
