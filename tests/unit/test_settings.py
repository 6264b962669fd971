"""`vitlens serve` settings: flags over environment over config file over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitlens_server.cli import build_parser, config_from_args
from vitlens_server.cli import main as serve_main
from vitlens_server.settings import SettingsError, parse_settings


def _args(argv, environ=None):
    return parse_settings(build_parser(), argv, environ or {})


def test_precedence_and_types(tmp_path) -> None:
    config = tmp_path / "vitlens.toml"
    config.write_text(
        'host = "0.0.0.0"\nmax_batch_size = 64\nmax-delay-ms = 2.5\nprecision = "bf16"\n'
        'model = ["vitlens-demo", "tiny=vit_tiny_patch16_224:random"]\n'
        'dataset_root = ["/data/a"]\n'
    )
    args = _args(["--config", str(config), "--max-batch-size", "8"], {"VITLENS_PORT": "6000"})
    assert args.max_batch_size == 8  # flag beats file
    assert args.port == 6000 and args.host == "0.0.0.0" and args.max_delay_ms == 2.5
    assert args.model == ["vitlens-demo", "tiny=vit_tiny_patch16_224:random"]
    assert args.dataset_root == [Path("/data/a")] and args.precision == "bf16"
    env = {"VITLENS_CONFIG": str(config), "VITLENS_MAX_BATCH_SIZE": "16", "VITLENS_MODEL": "a,b"}
    args = _args([], env)
    assert args.max_batch_size == 16 and args.model == ["a", "b"]  # environment beats file
    assert config_from_args(args).max_batch_size == 16


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("bogus = 1\n", {}, "unknown setting 'bogus'"),
        ("port = 'x'\n", {}, "'x' is not valid"),
        ("precision = 'fp8'\n", {}, "not one of fp32, tf32, bf16"),
        ("port = [\n", {}, "not valid TOML"),
        ("", {"VITLENS_PORT": "eighty"}, "VITLENS_PORT: 'eighty' is not valid"),
    ],
)
def test_bad_settings_say_what_is_wrong(tmp_path, text, environ, message) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        _args(["--config", str(config)], environ)


def test_a_bad_config_file_exits_non_zero(tmp_path, capsys) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("bogus = 1\n")
    assert serve_main(["--config", str(config)]) == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err
    assert serve_main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_help_documents_the_environment_and_file(capsys) -> None:
    with pytest.raises(SystemExit):
        serve_main(["--help"])
    text = capsys.readouterr().out
    assert "VITLENS_MAX_BATCH_SIZE" in text and "TOML" in text


def test_weights_must_lie_under_the_weights_roots(tmp_path, capsys) -> None:
    allowed = tmp_path / "models"
    allowed.mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (allowed / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    for weights in (tmp_path / "elsewhere.safetensors", allowed / "link.safetensors"):
        argv = ["--weights-root", str(allowed), "--model", f"m=vit_tiny_patch16_224:{weights}"]
        assert serve_main(argv) == 2
        assert "outside --weights-root" in capsys.readouterr().err
    inside = allowed / "ok.safetensors"
    args = _args(["--weights-root", str(allowed), "--model", f"m=vit_tiny_patch16_224:{inside}"])
    assert config_from_args(args).models[0].weights == inside
