"""Evaluation datasets, and the path rules that keep Evaluate inside the allowed folders."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from tests.rpc.test_hostile_datasets import png_header
from vitlens_server.data import CLASSES, SPLIT_STRIDE
from vitlens_server.data.voc import VOCDataset, export_voc, open_regular
from vitlens_server.errors import InvalidArgument, NotFound, PermissionDenied, clip
from vitlens_server.evaluate.datasets import (
    ECHO_CHARS,
    MAX_NAME_BYTES,
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


def test_voc_classes_are_matched_to_the_model_by_name(tmp_path) -> None:
    root = tmp_path / "allowed"
    export_voc(root / "voc", 4)
    in_order = open_server_path(str(root / "voc"), [root], CLASSES)
    reversed_labels = tuple(reversed(CLASSES))  # the model lists the same classes the other way
    reordered = open_server_path(str(root / "voc"), [root], reversed_labels)
    for i in range(4):
        folder, model = in_order[i], reordered[i]
        assert [reversed_labels[k] for k in model.labels] == [CLASSES[k] for k in folder.labels]
        np.testing.assert_array_equal(folder.masks, model.masks)
    shown = {CLASSES[k] for i in range(4) for k in in_order[i].labels}
    missing = next(iter(shown))
    fewer = tuple(name for name in CLASSES if name != missing)
    partial = open_server_path(str(root / "voc"), [root], fewer)
    with pytest.raises(InvalidArgument, match=f"shows class '{missing}', which is not a label"):
        for i in range(4):
            partial[i]


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


def test_synthetic_specs_stay_in_the_held_out_seed_range() -> None:
    assert len(parse_synthetic(f"synthetic:{SPLIT_STRIDE}")) == SPLIT_STRIDE  # a lazy range
    assert parse_synthetic(f"1:{SPLIT_STRIDE - 1}").seeds[0] == 3 * SPLIT_STRIDE - 1  # last one
    assert len(parse_synthetic("synthetic:007:0001")) == 7
    for bad in (
        f"synthetic:{SPLIT_STRIDE + 1}",
        f"synthetic:2:{SPLIT_STRIDE - 1}",
        f"synthetic:{10**30}",
        "synthetic:3:" + "9" * 5000,  # int() refuses this many digits with a ValueError
        "",
        "synthetic:",
        "two_object",
        "synthetic:-1",
        "synthetic:+1",
        "synthetic:1_0",
        "synthetic:\u0663",  # an Arabic-Indic digit three, which int() accepts
        "synthetic:3:1:two_object:x",
    ):
        with pytest.raises(InvalidArgument, match=r"N\[:seed\]\[:two_object\].*10,000,000") as err:
            parse_synthetic(bad)
        assert "9" * 201 not in str(err.value)


def test_client_strings_are_cut_in_messages() -> None:
    assert clip("abc") == "'abc'"
    assert clip("a\x00\udc80") == "'a\\x00\\udc80'"  # escaped, so any text is printable
    long = clip("x" * 1000)
    assert len(long) == ECHO_CHARS and long.endswith("…")


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        ("/a\x00b", "NUL byte"),
        ("/a\udc80b", "not valid Unicode"),
        ("/" + "n" * (MAX_NAME_BYTES + 1), f"{MAX_NAME_BYTES + 1}-byte component"),
        ("/" + "é" * 128, "256-byte component"),  # bytes, not characters
        ("/d" * 2100, "above the 4096 bytes"),
    ],
)
def test_odd_server_paths_are_invalid(tmp_path, suffix, message) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        resolve_allowed(f"{tmp_path}{suffix}", [tmp_path])
    assert "dataset.server_path" in str(err.value) and str(tmp_path) in str(err.value)
    assert len(str(err.value)) < 3 * ECHO_CHARS + len(str(tmp_path)) * 2
    with pytest.raises(InvalidArgument, match="is empty"):
        resolve_allowed("", [tmp_path])


def test_a_symlink_loop_is_invalid_not_an_error(tmp_path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(InvalidArgument, match="cannot be resolved"):
        open_server_path(str(tmp_path / "loop"), [tmp_path], CLASSES)
    _image_folder(tmp_path / "images", names=("disc",))
    (tmp_path / "images" / "disc" / "x.png").symlink_to(tmp_path / "images" / "disc" / "x.png")
    data = open_server_path(str(tmp_path / "images"), [tmp_path], CLASSES)
    with pytest.raises(InvalidArgument, match=r"'disc/x\.png' in the dataset folder cannot be"):
        data[1]


def test_files_and_missing_folders(tmp_path) -> None:
    _image_folder(tmp_path / "images", names=("disc",))
    with pytest.raises(InvalidArgument, match="is a file; a dataset must be a folder"):
        open_server_path(str(tmp_path / "images" / "disc" / "0.png"), [tmp_path], CLASSES)
    with pytest.raises(NotFound, match="does not exist"):
        open_server_path(str(tmp_path / "nope"), [tmp_path], CLASSES)
    with pytest.raises(NotFound, match="does not exist"):
        open_server_path(str(tmp_path / "images" / "disc" / "0.png" / "x"), [tmp_path], CLASSES)


def test_every_voc_file_goes_through_the_opener(tmp_path) -> None:
    root = export_voc(tmp_path / "voc", 1)
    opened = []

    def opener(path):
        opened.append(path.relative_to(root).as_posix())
        return open_regular(path)

    data = VOCDataset(root, "val", opener=opener)
    data[0]
    name = data.ids[0]
    assert opened == [
        "ImageSets/Segmentation/val.txt",
        "labels.txt",
        f"JPEGImages/{name}.jpg",
        f"SegmentationClass/{name}.png",
        f"SegmentationObject/{name}.png",
    ]


def test_a_symlinked_split_list_outside_the_root_is_denied_unread(tmp_path) -> None:
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    root = export_voc(allowed / "voc", 1)
    secret.mkdir()
    (secret / "passwords").write_text("root:hunter2\n")
    for file in ("ImageSets/Segmentation/val.txt", "labels.txt"):
        original = (root / file).read_bytes()
        (root / file).unlink()
        (root / file).symlink_to(secret / "passwords")
        with pytest.raises(PermissionDenied, match=f"'{file}' in the dataset folder is a sym"):
            try:
                open_server_path(str(root), [allowed], CLASSES)
            except PermissionDenied as err:
                assert "hunter2" not in str(err) and str(secret) not in str(err)
                raise
        (root / file).unlink()
        (root / file).write_bytes(original)
    assert len(open_server_path(str(root), [allowed], CLASSES)) == 1


def test_images_are_size_checked_from_their_header(tmp_path) -> None:
    _image_folder(tmp_path / "images", names=("disc",))  # one 8 x 8 image
    data = open_server_path(str(tmp_path / "images"), [tmp_path], CLASSES, max_pixels=63)
    with pytest.raises(InvalidArgument, match=r"'disc/0\.png' is 8x8 = 64 pixels, above .* 63"):
        data[0]
    (tmp_path / "images" / "disc" / "0.png").write_bytes(png_header(50_000, 50_000))
    data = open_server_path(str(tmp_path / "images"), [tmp_path], CLASSES)
    with pytest.raises(InvalidArgument, match=r"2,500,000,000 pixels|too large to decode safely"):
        data[0]  # Pillow's own bomb check or ours: never decoded
    root = export_voc(tmp_path / "voc", 1)
    data = open_server_path(str(root), [tmp_path], CLASSES, max_pixels=224 * 224 - 1)
    with pytest.raises(InvalidArgument, match="sample 0 of the dataset: 'JPEGImages/vitlens_"):
        data[0]


def test_corrupt_files_name_the_sample(tmp_path) -> None:
    _image_folder(tmp_path / "images", names=("disc", "star"))
    (tmp_path / "images" / "star" / "1.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    )  # was real
    (tmp_path / "images" / "star" / "2.png").write_bytes(b"")
    (tmp_path / "images" / "star" / "3.jpg").write_text("hello")
    os.mkfifo(tmp_path / "images" / "star" / "4.png")
    (tmp_path / "images" / "star" / "5.png").mkdir()
    data = open_server_path(str(tmp_path / "images"), [tmp_path], CLASSES)
    reasons = ["corrupt or truncated|not an image", "is empty", "not an image", "FIFO", "folder"]
    for index, reason in enumerate(reasons, start=1):
        with pytest.raises(InvalidArgument, match=f"^sample {index} of the dataset: 'star/") as err:
            data[index]
        assert re.search(reason, str(err.value)) and str(tmp_path) not in str(err.value)


def test_malformed_layouts(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="holds no class folders"):
        open_server_path(str(tmp_path / "empty"), [tmp_path], CLASSES)
    (tmp_path / "no_images" / "disc").mkdir(parents=True)
    (tmp_path / "no_images" / "disc" / "a.txt").write_text("x")
    with pytest.raises(InvalidArgument, match=r"class folders of the dataset \('disc'\) hold no"):
        open_server_path(str(tmp_path / "no_images"), [tmp_path], CLASSES)
    root = export_voc(tmp_path / "voc", 1)
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text("\n")
    with pytest.raises(InvalidArgument, match=r"val\.txt of the VOC dataset folder lists no image"):
        open_server_path(str(root), [tmp_path], CLASSES)
    split.write_text("ok_id\n/etc/passwd\n")
    with pytest.raises(InvalidArgument, match="line 2 holds no valid image id") as err:
        open_server_path(str(root), [tmp_path], CLASSES)
    assert "passwd" not in str(err.value)
    split.unlink()
    with pytest.raises(InvalidArgument, match=r"has no ImageSets/Segmentation/val\.txt"):
        open_server_path(str(root), [tmp_path], CLASSES)


def test_open_regular_refuses_what_is_not_a_file_without_blocking(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would block without O_NONBLOCK
    with pytest.raises(OSError, match="FIFO"):
        open_regular(tmp_path / "fifo")
    with pytest.raises(IsADirectoryError):
        open_regular(tmp_path)
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with open_regular(tmp_path / "link") as handle:
        assert handle.read() == b"x"
    with pytest.raises(OSError):  # ELOOP: a symlink swapped in after the check is not followed
        open_regular(tmp_path / "link", follow_symlinks=False)
