"""The exemplar VQA models' construction, data, resumable training and export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from vitlens_server.data.questions import ANSWERS, KINDS, answer_index, question_mask
from vitlens_server.models.bimodal.frontend import PatchFrontEnd, patch_boxes
from vitlens_server.training.accuracy import to_model_input
from vitlens_server.training.clip_model import model_cfg_at
from vitlens_server.training.vqa_data import held_out, make_batch, patch_targets, tokenize
from vitlens_server.training.vqa_export import load_exported
from vitlens_server.training.vqa_model import build_vilt, clip_visual_to_vilt
from vitlens_server.training.vqa_net import ARCHS, MEAN, STD, build_net
from vitlens_server.training.vqa_train import VqaTrainConfig, train_vqa

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    torch.manual_seed(1)
    return open_clip.CLIP(**model_cfg_at(160)).visual.eval()


def _tower_tokens(visual: torch.nn.Module, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    """(B, 1 + n, D) the tower's tokens after ``blocks`` blocks, read by a forward hook."""
    seen: list[torch.Tensor] = []
    hook = visual.transformer.resblocks[blocks - 1].register_forward_hook(
        lambda module, args, out: seen.append(out)
    )
    with torch.no_grad():
        visual(pixels)
    hook.remove()
    return seen[0]


def test_vilt_initialised_from_a_clip_tower_computes_the_towers_image_tokens(tower) -> None:
    vilt = build_vilt(tower).vilt.eval()
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        tokens, _, (patch_index, _) = vilt.embeddings.visual_embed(
            pixels, torch.ones(2, 160, 160, dtype=torch.long), max_image_length=-1
        )
        tokens = tokens + vilt.embeddings.token_type_embeddings(
            torch.ones(2, tokens.shape[1], dtype=torch.long)
        )
        for layer in vilt.encoder.layer:
            tokens = layer(tokens)[0]
        tokens = vilt.layernorm(tokens)  # (2, 101, 192), patches in ViLT's random order
        expected = tower.ln_post(_tower_tokens(tower, pixels, len(tower.transformer.resblocks)))
    raster = patch_index[..., 0] * 10 + patch_index[..., 1]  # (2, 100)
    unshuffled = torch.empty_like(tokens)
    unshuffled[:, 0] = tokens[:, 0]
    for b in range(2):
        unshuffled[b, 1 + raster[b]] = tokens[b, 1:]
    torch.testing.assert_close(unshuffled, expected, atol=1e-4, rtol=1e-4)
    assert not clip_visual_to_vilt(tower)["vilt.embeddings.token_type_embeddings.weight"].any()


def test_the_patch_front_end_reads_the_tokens_before_the_last_block_and_patch_boxes(tower) -> None:
    frontend = PatchFrontEnd(tower)
    pixels = torch.randn(2, 3, 160, 160)
    features, boxes = frontend(pixels)
    expected = _tower_tokens(tower, pixels, len(tower.transformer.resblocks) - 1)[:, 1:]
    torch.testing.assert_close(features, expected)
    assert boxes.shape == (2, 100, 4)
    # patch 12 is row 1, column 2 of the 10 x 10 grid
    torch.testing.assert_close(boxes[0, 12], torch.tensor([0.2, 0.1, 0.3, 0.2]))
    assert torch.equal(patch_boxes((2, 3))[-1], torch.tensor([2 / 3, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="outside"):
        PatchFrontEnd(tower, layer=7)


def test_training_batches_are_a_function_of_their_step() -> None:
    first = make_batch(3, batch_size=6, size=64, two_object_fraction=0.5)
    again = make_batch(3, batch_size=6, size=64, two_object_fraction=0.5)
    other = make_batch(4, batch_size=6, size=64, two_object_fraction=0.5)
    assert first.questions == again.questions and np.array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)
    assert first.answers.tolist() == [answer_index(q.answer) for q in first.questions]


def test_held_out_sets_cycle_the_kinds_over_one_and_two_object_scenes() -> None:
    batch = held_out("val", 0, 10, size=64)
    assert [q.kind for q in batch.questions] == [*KINDS, *KINDS]
    assert [len(s.objects) for s in batch.scenes] == [1, 2] * 5
    tail = held_out("val", 5, 5, size=64)  # the same questions, read from an offset
    assert tail.questions == batch.questions[5:]
    with pytest.raises(ValueError, match="held-out"):
        held_out("train", 0, 2, size=64)


def test_a_held_out_scene_without_a_question_of_its_kind_gets_the_next_kind() -> None:
    (question,) = held_out("val", 61, 1, size=160).questions  # two objects of one colour
    assert 61 % len(KINDS) == KINDS.index("shape") and question.kind == "colour"


def test_question_tokens_are_whole_words_of_the_vocabulary() -> None:
    from vitlens_server.training.vqa_model import question_tokenizer

    tokenizer = question_tokenizer()
    batch = held_out("test", 0, 10, size=64)
    ids, mask = tokenize(tokenizer, batch.questions, CPU)
    assert ids.shape == mask.shape and (ids[mask.bool()] != tokenizer.unk_token_id).all()
    words = tokenizer.convert_ids_to_tokens(ids[0][mask[0].bool()].tolist())
    assert words[1:-1] == batch.questions[0].text.replace("?", " ?").split()


def test_grounding_targets_are_the_asked_objects_share_of_each_patch() -> None:
    batch = held_out("val", 0, 10, size=160)
    targets = patch_targets(batch, 100)  # (B, 100): 16 px patches
    assert targets.shape == (10, 100)
    for i, (scene, question) in enumerate(zip(batch.scenes, batch.questions, strict=True)):
        mask = question_mask(scene, question)  # (160, 160)
        assert targets[i].sum().item() == pytest.approx(mask.sum() / 256, rel=1e-5)
        if not question.about:  # a "no" or a "zero": no patch is about anything
            assert targets[i].max() == 0
            continue
        row, col = np.argwhere(mask)[0] // 16  # a patch holding the object's first pixel
        assert targets[i, row * 10 + col] > 0
    with pytest.raises(ValueError, match="square grid"):
        patch_targets(batch, 99)


@pytest.mark.parametrize("arch", ARCHS)
def test_grounding_scores_come_with_the_answer_in_raster_order(arch) -> None:
    net = build_net(arch, clip=False).eval()
    batch = held_out("val", 0, 3, size=160)
    pixels = to_model_input(batch.images, MEAN, STD, CPU)
    ids, mask = tokenize(net.tokenizer, batch.questions, CPU)
    with torch.no_grad():
        torch.manual_seed(1)  # ViLT's patch embedding draws its token order at random
        logits, scores = net.grounded(pixels, ids, mask)
        torch.manual_seed(2)
        _, again = net.grounded(pixels, ids, mask)
        plain = net(pixels, ids, mask)
    assert scores.shape == (3, 100)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, again, atol=1e-5, rtol=1e-5)
    assert scores.std(dim=1).min() > 0  # one score per patch, not one broadcast value


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stopped_run_resumes_as_if_uninterrupted_and_exports_what_it_evaluated(
    arch, tmp_path
) -> None:
    config = VqaTrainConfig(
        arch=arch,
        steps=4,
        batch_size=3,
        warmup_steps=2,
        eval_every=2,
        eval_count=2,
        final_eval_count=5,
        checkpoint_every_s=1e9,
    )
    straight = dataclasses.replace(config, out=tmp_path / "a", export_dir=tmp_path / "a-out")
    stopped = dataclasses.replace(config, out=tmp_path / "b", export_dir=tmp_path / "b-out")
    done = train_vqa(straight)
    assert done is not None and done["metrics"]["count"] == 5
    assert train_vqa(stopped, stop_at_step=2) is None
    assert not (tmp_path / "b-out").exists()
    resumed = train_vqa(stopped, resume=True)
    assert resumed is not None
    scores = [{k: v for k, v in point.items() if k != "minutes"} for point in done["curve"]]
    assert [{k: v for k, v in p.items() if k != "minutes"} for p in resumed["curve"]] == scores
    assert resumed["metrics"] == done["metrics"]
    a = load_file(tmp_path / "a-out" / "model.safetensors")
    b = load_file(tmp_path / "b-out" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-3, rtol=2e-3)  # float16 storage
    sidecar = json.loads((tmp_path / "a-out" / "vitlens.json").read_text())
    assert sidecar["answers"] == list(ANSWERS)
    assert sidecar["visual_input"] == ("pixels" if arch == "vilt" else "regions")
    assert ("frontend" in sidecar) == (arch != "vilt")
    # the export reloads into float32 and answers as the evaluated model did
    net, size = load_exported(tmp_path / "a-out")
    batch = held_out("test", 0, 5, size=size)
    ids, mask = tokenize(net.tokenizer, batch.questions, CPU)
    with torch.no_grad():
        logits = net(to_model_input(batch.images, MEAN, STD, CPU), ids, mask)
    right = (logits.argmax(1) == batch.answers).float().mean().item()
    assert right == pytest.approx(done["metrics"]["accuracy"])


def test_a_continuation_starts_from_the_earlier_weights_on_the_scenes_after_them(
    tmp_path, monkeypatch
) -> None:
    from vitlens_server.training import vqa_train

    first = VqaTrainConfig(
        arch="visualbert",
        steps=2,
        batch_size=2,
        warmup_steps=1,
        eval_every=0,
        final_eval_count=2,
        out=tmp_path / "a",
        export_dir=tmp_path / "a-out",
    )
    train_vqa(first)
    checkpoint = tmp_path / "a" / "visualbert.ckpt"
    unchanged = dataclasses.replace(
        first, init_from=checkpoint, steps=0, out=tmp_path / "b", export_dir=tmp_path / "b-out"
    )
    record = train_vqa(unchanged)
    assert record is not None and record["earlier_run"]["step"] == 2
    a = load_file(tmp_path / "a-out" / "model.safetensors")
    b = load_file(tmp_path / "b-out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    steps: list[int] = []

    def recording(step: int, **kwargs):
        steps.append(step)
        return make_batch(step, **kwargs)

    monkeypatch.setattr(vqa_train, "make_batch", recording)
    train_vqa(
        dataclasses.replace(unchanged, steps=2, out=tmp_path / "c", export_dir=tmp_path / "c-out")
    )
    assert steps == [2, 3]  # the scenes after the earlier run's, not its own again


def test_the_command_line_takes_every_option(capsys) -> None:
    from vitlens_server.training.vqa_train import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    assert "--arch {vilt,visualbert,lxmert}" in usage and "--max-minutes" in usage
