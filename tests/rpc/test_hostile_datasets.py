"""Hostile datasets over real gRPC (issue #14): escaping symlinks, odd paths, corrupt images,
out-of-range specs and malformed folders all get a precise client-error status whose message
says what to fix, reveals nothing outside the allowed folders and logs no ERROR."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from PIL import Image

from tests.conftest import start_server
from tests.tiny import tiny_loaded
from vitlens.v1 import vitlens_pb2, vitlens_pb2_grpc
from vitlens_server.config import ServerConfig
from vitlens_server.data.voc import export_voc
from vitlens_server.models import ModelRegistry, load_model
from vitlens_server.models.default import demo_spec

DEMO = demo_spec().name  # the scene labels, for VOC folders
SECRET = "TOP-SECRET-LINE"  # what the files outside the allowed folder hold
MAX_PIXELS = 200_000  # the server's pixel limit: 224 x 224 scenes pass


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds almost none of them: its
    size is refused from the header, or it would fail as truncated when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _png(path: Path, size: int = 32, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _voc_id(root: Path) -> str:
    return (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]


def _build(allowed: Path, secret: Path) -> None:
    """Every dataset the tests name, under ``allowed``; the secrets under ``secret``."""
    secret.mkdir()
    (secret / "passwords.txt").write_text(f"{SECRET}\n{SECRET}-2\n")
    _png(secret / "c0" / "x.png")
    Image.fromarray(np.zeros((224, 224, 3), np.uint8)).save(secret / "img.jpg")
    Image.new("L", (224, 224), 1).save(secret / "mask.png")
    (secret / "ImageSets" / "Segmentation").mkdir(parents=True)
    (secret / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{SECRET}\n")

    _png(allowed / "good" / "c0" / "a.png", value=30)
    _png(allowed / "good" / "c1" / "b.png", value=200)
    template = export_voc(allowed / "voc", 2)
    name = _voc_id(template)

    def voc(folder: str) -> Path:
        return Path(shutil.copytree(template, allowed / folder, symlinks=True))

    # symlinks out of the allowed folder
    (allowed / "link_dir").symlink_to(secret, target_is_directory=True)
    split = voc("voc_split_link") / "ImageSets" / "Segmentation" / "val.txt"
    split.unlink()
    split.symlink_to(secret / "passwords.txt")
    (voc("voc_labels_link") / "labels.txt").unlink()
    (allowed / "voc_labels_link" / "labels.txt").symlink_to(secret / "passwords.txt")
    image = voc("voc_image_link") / "JPEGImages" / f"{name}.jpg"
    image.unlink()
    image.symlink_to(secret / "img.jpg")
    mask = voc("voc_mask_link") / "SegmentationClass" / f"{name}.png"
    mask.unlink()
    mask.symlink_to(secret / "mask.png")
    shutil.rmtree(voc("voc_sets_link") / "ImageSets")
    (allowed / "voc_sets_link" / "ImageSets").symlink_to(secret / "ImageSets")
    (allowed / "folder_class_link").mkdir()
    (allowed / "folder_class_link" / "c0").symlink_to(secret / "c0", target_is_directory=True)
    (allowed / "folder_image_link" / "c0").mkdir(parents=True)
    (allowed / "folder_image_link" / "c0" / "leak.png").symlink_to(secret / "c0" / "x.png")

    # not folders
    os.mkfifo(allowed / "fifo")

    # corrupt or oversized images in an ImageFolder
    good_png = (allowed / "good" / "c0" / "a.png").read_bytes()
    bad_images = {
        "truncated": ("x.png", good_png[: len(good_png) // 2]),
        "empty": ("x.png", b""),
        "text": ("x.jpg", b"hello, I am not a JPEG\n"),
        "bomb": ("x.png", png_header(8000, 6000)),  # 48 MP: above any limit, even the default
    }
    for folder, (file, data) in bad_images.items():
        (allowed / f"image_{folder}" / "c0").mkdir(parents=True)
        (allowed / f"image_{folder}" / "c0" / file).write_bytes(data)
    (allowed / "image_folder" / "c0" / "x.png").mkdir(parents=True)
    (allowed / "image_fifo" / "c0").mkdir(parents=True)
    os.mkfifo(allowed / "image_fifo" / "c0" / "x.png")

    # corrupt VOC samples
    (voc("voc_bad_jpeg") / "JPEGImages" / f"{name}.jpg").write_bytes(os.urandom(500))
    Image.new("L", (10, 10)).save(voc("voc_mask_size") / "SegmentationClass" / f"{name}.png")
    Image.new("RGB", (224, 224)).save(voc("voc_mask_mode") / "SegmentationClass" / f"{name}.png")
    (voc("voc_mask_missing") / "SegmentationClass" / f"{name}.png").unlink()
    (voc("voc_image_missing") / "JPEGImages" / f"{name}.jpg").unlink()
    Image.new("L", (224, 224), 50).save(voc("voc_mask_value") / "SegmentationClass" / f"{name}.png")
    Image.new("L", (224, 224), 0).save(voc("voc_mask_empty") / "SegmentationClass" / f"{name}.png")
    (voc("voc_mask_bomb") / "SegmentationClass" / f"{name}.png").write_bytes(png_header(9000, 9000))

    # malformed layouts
    (allowed / "folder_empty").mkdir()
    (allowed / "folder_empty" / "README.txt").write_text("no class folders here\n")
    _png(allowed / "folder_giraffe" / "giraffe" / "x.png")
    (allowed / "folder_no_images" / "c0").mkdir(parents=True)
    (allowed / "folder_no_images" / "c0" / "notes.txt").write_text("not an image\n")
    _png(allowed / "folder_no_images" / ".hidden" / "x.png")
    sets = "ImageSets/Segmentation/val.txt"
    (voc("voc_split_empty") / sets).write_text("\n\n")
    (voc("voc_split_missing") / sets).unlink()
    (voc("voc_split_bad_id") / sets).write_text(f"{name}\n../../../{secret.name}/passwords\n")
    (voc("voc_split_binary") / sets).write_bytes(b"\xff\xfe\x00garbage\x80\n")
    (voc("voc_labels_empty") / "labels.txt").write_text("")
    (allowed / "voc_no_sets" / "JPEGImages").mkdir(parents=True)


@dataclass
class Hostile:
    """A server allowing one folder of hostile datasets: its channel and stub, that folder and
    the secret folder beside it."""

    channel: grpc.Channel
    stub: vitlens_pb2_grpc.VitlensServiceStub
    allowed: Path
    secret: Path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Iterator[Hostile]:
    """The server of `Hostile`, module-wide."""
    base = tmp_path_factory.mktemp("hostile")
    allowed, secret = base / "allowed", base / "secret"
    _build(allowed, secret)
    config = ServerConfig(port=0, dataset_roots=(allowed,), max_batch_size=4, max_pixels=MAX_PIXELS)
    registry = ModelRegistry([tiny_loaded(seed=3), load_model(demo_spec())])
    running, stop = start_server(config, registry)
    channel = grpc.insecure_channel(running.address)
    try:
        yield Hostile(channel, vitlens_pb2_grpc.VitlensServiceStub(channel), allowed, secret)
    finally:
        channel.close()
        stop()


@pytest.fixture(autouse=True)
def no_error_logs(caplog) -> Iterator[None]:
    """No test here may make the server log an ERROR (a traceback)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def _request(dataset: vitlens_pb2.Dataset, model: str = "tiny") -> vitlens_pb2.EvaluateRequest:
    if model == "tiny":  # ImageFolder samples have no masks: a metric without them
        steps = struct_pb2.Struct()
        steps.update({"steps": 2})
        return vitlens_pb2.EvaluateRequest(
            model=model,
            methods=["random"],
            metrics=["deletion"],
            metric_options={"deletion": steps},
            dataset=dataset,
        )
    return vitlens_pb2.EvaluateRequest(
        model=model, methods=["oracle"], metrics=["segmentation"], dataset=dataset
    )


def _refused(stub, dataset: vitlens_pb2.Dataset, model: str = "tiny") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Evaluate(_request(dataset, model), timeout=60))
    return caught.value


def _path(stub, path: str, model: str = "tiny") -> grpc.RpcError:
    return _refused(stub, vitlens_pb2.Dataset(server_path=path), model)


def _assert_discreet(err: grpc.RpcError, allowed: Path, secret: Path) -> None:
    """Nothing outside the allowed folder in the message: no secret path, no secret text."""
    details = err.details()
    assert str(secret) not in details and SECRET not in details and "passwords" not in details
    assert len(details) < 1200, details


def test_good_server_datasets_still_evaluate(hostile) -> None:
    stub, allowed = hostile.stub, hostile.allowed
    events = list(stub.Evaluate(_request(vitlens_pb2.Dataset(server_path=str(allowed / "good")))))
    assert events[-1].result.metric == "deletion"
    events = list(
        stub.Evaluate(_request(vitlens_pb2.Dataset(server_path=str(allowed / "voc")), DEMO))
    )
    iou = next(v for v in events[-1].result.values if v.name == "iou")
    assert iou.n == 2 and iou.mean == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("folder", "model", "names"),
    [
        ("link_dir", "tiny", "dataset.server_path"),
        ("good/../../secret", "tiny", "dataset.server_path"),
        ("voc_split_link", DEMO, "ImageSets/Segmentation/val.txt"),
        ("voc_labels_link", DEMO, "labels.txt"),
        ("voc_image_link", DEMO, "JPEGImages/vitlens_"),
        ("voc_mask_link", DEMO, "SegmentationClass/vitlens_"),
        ("voc_sets_link", DEMO, "ImageSets/Segmentation/val.txt"),
        ("folder_class_link", "tiny", "'c0'"),
        ("folder_image_link", "tiny", "c0/leak.png"),
    ],
)
def test_symlinks_out_of_the_allowed_folders_are_denied(hostile, folder, model, names) -> None:
    stub, allowed, secret = hostile.stub, hostile.allowed, hostile.secret
    err = _path(stub, f"{allowed}/{folder}", model)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert names in err.details() and "outside" in err.details()
    _assert_discreet(err, allowed, secret)


@pytest.mark.parametrize(
    ("make_path", "fragment"),
    [
        (lambda root: f"{root}/good\x00/c0", "NUL byte"),
        (lambda root: f"{root}/{'a' * 300}", "300-byte component"),
        (lambda root: f"{root}/" + "/".join(["b" * 200] * 25), "above the 4096 bytes"),
        (lambda root: "good/c0", "absolute path"),
        (lambda root: "../../etc/passwd", "absolute path"),
        (lambda root: "", "is empty"),
    ],
    ids=["nul", "long-component", "long-path", "relative", "relative-dotdot", "empty"],
)
def test_odd_server_paths_are_invalid(hostile, make_path, fragment) -> None:
    stub, allowed, secret = hostile.stub, hostile.allowed, hostile.secret
    err = _path(stub, make_path(allowed))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    details = err.details()
    assert "dataset.server_path" in details and fragment in details
    assert str(allowed) in details  # says what is allowed
    assert "a" * 201 not in details and "b" * 201 not in details  # client text cut to 200
    _assert_discreet(err, allowed, secret)


def test_a_server_path_that_is_not_utf8_is_invalid(hostile) -> None:
    # The SDK cannot even build such a request; a raw client sends bytes that fail protobuf's
    # UTF-8 check, which the RPC layer answers before any dataset code runs.
    request = _request(vitlens_pb2.Dataset(server_path=f"{hostile.allowed}/\u00e9"))
    payload = request.SerializeToString().replace("\u00e9".encode(), b"\xed\xb2")  # bad UTF-8
    raw = hostile.channel.unary_stream(
        "/vitlens.v1.VitlensService/Evaluate",
        request_serializer=None,
        response_deserializer=vitlens_pb2.EvaluateEvent.FromString,
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(raw(payload, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


@pytest.mark.parametrize(
    ("folder", "code", "fragment"),
    [
        ("good/c0/a.png", "INVALID_ARGUMENT", "is a file; a dataset must be a folder"),
        ("fifo", "INVALID_ARGUMENT", "is not a folder"),
        ("nope", "NOT_FOUND", "does not exist"),
        ("good/c0/a.png/nope", "NOT_FOUND", "does not exist"),
    ],
)
def test_files_and_missing_folders(hostile, folder, code, fragment) -> None:
    stub, allowed, secret = hostile.stub, hostile.allowed, hostile.secret
    err = _path(stub, f"{allowed}/{folder}")
    assert err.code() == grpc.StatusCode[code], err.details()
    assert fragment in err.details() and "dataset.server_path" in err.details()
    _assert_discreet(err, allowed, secret)


@pytest.mark.parametrize(
    ("folder", "model", "names", "why"),
    [
        ("image_truncated", "tiny", "c0/x.png", "corrupt or truncated"),
        ("image_empty", "tiny", "c0/x.png", "is empty"),
        ("image_text", "tiny", "c0/x.jpg", "is not an image"),
        (
            "image_bomb",
            "tiny",
            "c0/x.png",
            "48,000,000 pixels, above this server's limit of 200,000",
        ),
        ("image_folder", "tiny", "c0/x.png", "is a folder"),
        ("image_fifo", "tiny", "c0/x.png", "is a FIFO, socket or device"),
        ("voc_bad_jpeg", DEMO, "JPEGImages/vitlens_", "is not an image"),
        (
            "voc_mask_size",
            DEMO,
            "SegmentationClass/vitlens_",
            "is 10x10 but its image is 224x224",
        ),
        ("voc_mask_mode", DEMO, "SegmentationClass/vitlens_", "indexed (P) or greyscale (L)"),
        ("voc_mask_missing", DEMO, "SegmentationClass/vitlens_", "is missing"),
        ("voc_image_missing", DEMO, "JPEGImages/vitlens_", "is missing"),
        ("voc_mask_value", DEMO, "SegmentationClass/vitlens_", "value 50, beyond the 8 labels"),
        ("voc_mask_empty", DEMO, "SegmentationClass/vitlens_", "marks no object"),
        ("voc_mask_bomb", DEMO, "SegmentationClass/vitlens_", "is 9000x9000 = 81,000,000 pixels"),
    ],
)
def test_corrupt_or_oversized_samples_are_named(hostile, folder, model, names, why) -> None:
    stub, allowed, secret = hostile.stub, hostile.allowed, hostile.secret
    err = _path(stub, f"{allowed}/{folder}", model)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    details = err.details()
    assert details.startswith("sample 0 of the dataset: ") and names in details and why in details
    assert str(allowed) not in details  # files are named relative to the dataset folder
    _assert_discreet(err, allowed, secret)


@pytest.mark.parametrize(
    "spec",
    [
        "synthetic:10000001",
        "synthetic:" + "9" * 31,
        f"synthetic:{10**30}:1",
        "synthetic:5:9999999",
        "synthetic:0",
        "synthetic:-3",
        "synthetic:3:x",
        "synthetic:3:1:2",
        "synthetic:3:two_object:two_object",
        "synthetic:",
        "synthetic:two_object",
        "synthetic: 3",
        "synthetic:+3",
        "synthetic:1_000",
        "synthetic:\u0663",  # an Arabic-Indic 3, which int() would take
        "synthetic:3:" + "9" * 5000,  # int() refuses over 4,300 digits with a ValueError
    ],
)
def test_synthetic_specs_out_of_range_are_invalid(hostile, spec) -> None:
    stub, allowed, secret = hostile.stub, hostile.allowed, hostile.secret
    err = _refused(stub, vitlens_pb2.Dataset(synthetic=spec))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "N[:seed][:two_object]" in err.details() and "10,000,000" in err.details()
    assert "9" * 201 not in err.details()
    _assert_discreet(err, allowed, secret)


@pytest.mark.parametrize(
    ("folder", "model", "fragment"),
    [
        ("folder_empty", "tiny", "holds no class folders"),
        ("folder_giraffe", "tiny", "class folder 'giraffe' of the dataset is not a label"),
        ("folder_no_images", "tiny", "class folders of the dataset ('c0') hold no images"),
        ("voc_split_empty", DEMO, "ImageSets/Segmentation/val.txt of the VOC dataset folder"),
        ("voc_split_missing", DEMO, "has no ImageSets/Segmentation/val.txt"),
        ("voc_split_bad_id", DEMO, "line 2 holds no valid image id"),
        ("voc_split_binary", DEMO, "is not UTF-8 text"),
        ("voc_labels_empty", DEMO, "'labels.txt' lists no class names"),
        ("voc_no_sets", DEMO, "has no ImageSets/Segmentation/val.txt"),
    ],
)
def test_malformed_layouts_say_what_is_wrong(hostile, folder, model, fragment) -> None:
    stub, allowed, secret = hostile.stub, hostile.allowed, hostile.secret
    err = _path(stub, f"{allowed}/{folder}", model)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert fragment in err.details()
    assert str(allowed) not in err.details()  # relative names only
    _assert_discreet(err, allowed, secret)
