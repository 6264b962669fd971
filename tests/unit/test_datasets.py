"""Evaluation datasets, and the path rules that keep Evaluate inside the allowed folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitlens_server.data import CLASSES
from vitlens_server.data.voc import export_voc
from vitlens_server.errors import InvalidArgument, PermissionDenied
from vitlens_server.evaluate.datasets import (
    FolderDataset,
    VOCFolder,
    open_server_path,
    parse_synthetic,
    resolve_allowed,
)


def test_synthetic_specs() -> None:
    data = parse_synthetic("synthetic:3:7:two_object")
    assert len(data) == 3 and data.two_object and data.name == "synthetic:3:7:two_object"
    sample = data[0]
    assert sample.image.shape == (224, 224, 3) and len(sample.labels) == 2
    assert sample.masks.shape == (2, 224, 224) and sample.masks.dtype == bool
    assert len(parse_synthetic("5")) == 5 and not parse_synthetic("synthetic:5:1").two_object
    for bad in ("synthetic:0", "synthetic:x", "synthetic:3:-1", "synthetic:3:1:2"):
        with pytest.raises(InvalidArgument, match="N\\[:seed\\]"):
            parse_synthetic(bad)


def test_voc_folder_under_an_allowed_root(tmp_path) -> None:
    root = tmp_path / "allowed"
    export_voc(root / "voc", 3)
    data = open_server_path(str(root / "voc"), [root], CLASSES)
    assert isinstance(data, VOCFolder) and len(data) == 3
    sample = data[1]
    assert sample.masks.shape[0] == len(sample.labels) and sample.masks[0].any()


def _image_folder(root, names=("disc", "star")) -> None:
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")


def test_image_folder_labels_come_from_folder_names(tmp_path) -> None:
    _image_folder(tmp_path / "allowed" / "images")
    data = open_server_path(str(tmp_path / "allowed" / "images"), [tmp_path / "allowed"], CLASSES)
    assert isinstance(data, FolderDataset) and len(data) == 2
    assert [data[i].labels for i in range(2)] == [
        (CLASSES.index("disc"),),
        (CLASSES.index("star"),),
    ]
    assert data[0].masks is None
    _image_folder(tmp_path / "allowed" / "bad", names=("giraffe",))
    with pytest.raises(InvalidArgument, match="giraffe"):
        open_server_path(str(tmp_path / "allowed" / "bad"), [tmp_path / "allowed"], CLASSES)


def test_paths_outside_the_allowed_roots_are_denied(tmp_path) -> None:
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    allowed.mkdir()
    _image_folder(secret)
    with pytest.raises(PermissionDenied, match="outside"):
        resolve_allowed(secret, [allowed])
    with pytest.raises(PermissionDenied, match="outside"):
        resolve_allowed(f"{allowed}/../secret", [allowed])  # no .. escape
    (allowed / "link").symlink_to(secret, target_is_directory=True)
    with pytest.raises(PermissionDenied, match="outside"):
        open_server_path(str(allowed / "link"), [allowed], CLASSES)  # no symlink escape
    with pytest.raises(PermissionDenied, match="allows no dataset folders"):
        resolve_allowed(allowed, [])
    with pytest.raises(InvalidArgument, match="absolute"):
        resolve_allowed("relative/path", [allowed])


def test_a_symlinked_file_inside_an_allowed_folder_is_not_read(tmp_path) -> None:
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    _image_folder(allowed / "images", names=("disc",))
    _image_folder(secret, names=("star",))
    (allowed / "images" / "disc" / "leak.png").symlink_to(secret / "star" / "0.png")
    data = open_server_path(str(allowed / "images"), [allowed], CLASSES)
    assert len(data) == 2
    data[0]  # the real file reads
    with pytest.raises(PermissionDenied, match="outside"):
        data[1]  # the symlink to a file outside the root does not
