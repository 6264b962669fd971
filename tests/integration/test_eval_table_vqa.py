"""scripts/eval_table.py on a VQA model: one ``vqa`` part, alias rows, seed 003's orderings.

A tiny random ViLT over the generated questions' words, answering `questions.ANSWERS` (64 px,
4 x 4 patches), is served in process; the script evaluates it through ``--address``, block by
block and resumably, as it evaluates vitlens-visualbert and vitlens-lxmert.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from tests.conftest import start_server
from tests.unit.image_text_tiny import sharpen
from vitlens import Client
from vitlens.evaluation import EvaluationResult, MetricResult, Statistic
from vitlens_server.config import ServerConfig
from vitlens_server.data.questions import ANSWERS, vocab_lines
from vitlens_server.models import ModelRegistry, ModelSpec, load_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
METHODS = "random,rollout,transformer_attribution,generic,generic+lrp"
METRICS = "perturbation_image,perturbation_text,segmentation"


def _script():
    spec = importlib.util.spec_from_file_location("eval_table", ROOT / "scripts" / "eval_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = Path(tmp_path_factory.mktemp("vilt"))
    config = tf.ViltConfig(
        vocab_size=len(vocab_lines()), hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_hidden_layers=2, max_position_embeddings=16,
        image_size=SIZE, patch_size=16, max_image_length=-1, num_labels=len(ANSWERS),
        id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)},
    )  # fmt: skip
    torch.manual_seed(3)
    sharpen(tf.ViltForQuestionAnswering(config), 3).save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(vocab_lines()) + "\n")
    (path / "vitlens.json").write_text(json.dumps({"image_size": SIZE, "answers": list(ANSWERS)}))
    model = load_model(ModelSpec(name="vqa", architecture="hf-vqa", source=f"hf-vqa:{path}"))
    running, stop = start_server(ServerConfig(port=0, max_batch_size=4), ModelRegistry([model]))
    yield running
    stop()


def test_a_vqa_model_gets_one_part_alias_rows_orderings_and_resumes(served, tmp_path) -> None:
    table = _script()
    argv = ["--address", served.address, "--model", "vqa", "--scenes", "3", "--block", "2"]
    argv += ["--methods", METHODS, "--metrics", METRICS, "--out", str(tmp_path)]
    assert table.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "vqa-0000.json",
        "vqa-0002.json",
    ]
    record = json.loads((tmp_path / "shards" / "vqa-0000.json").read_text())
    assert record["dataset"] == "synthetic_vqa:2:0" and len(record["weights_sha256"]) == 64
    assert record["stream_architecture"] == "single_stream" and record["calls"] == 2
    assert record["plan"]["calls"] == [
        {
            "methods": ["random", "rollout", "transformer_attribution", "generic"],
            "method_options": {},
        },
        {"methods": ["generic+lrp"], "method_options": {"generic": {"averaging": "lrp"}}},
    ]
    rows = list(dict.fromkeys(r["method"] for r in record["results"]))
    assert rows == METHODS.split(",")  # the plan's order, generic+lrp under its own name

    # The alias row is generic with averaging=lrp, as one Evaluate call gives it.
    with Client(served.address) as client:
        direct = client.evaluate(
            ["generic"], ["perturbation_text"], dataset="synthetic_vqa:2:0", model="vqa",
            method_options={"generic": {"averaging": "lrp"}},
        )  # fmt: skip
    block = EvaluationResult.from_dict(record)
    alias = block.get("generic+lrp", "perturbation_text")
    assert alias.values == direct.get("generic", "perturbation_text").values

    merged = EvaluationResult.from_dict(json.loads((tmp_path / "vqa" / "results.json").read_text()))
    assert merged.dataset == "synthetic_vqa:3:0"
    assert merged.get("generic+lrp", "perturbation_image").value("positive_auc").n == 3
    report = (tmp_path / "vqa" / "report.md").read_text()
    assert "## perturbation_image" in report and "## perturbation_text" in report
    for png in ("perturbation_image_positive", "perturbation_text_negative"):
        assert (tmp_path / "vqa" / f"{png}.png").stat().st_size > 0
    summary = (tmp_path / "README.md").read_text()
    assert "# Evaluation of every method on vqa" in summary
    assert "## vqa: `synthetic_vqa:3:0`, 5 methods" in summary
    assert "in 4 Evaluate calls" in summary and "question-methods/s" in summary
    assert "| method | image P-AUC ↓ | image N-AUC ↑ | text P-AUC ↓ | text N-AUC ↑ |" in summary
    assert "| `generic+lrp` | " in summary
    lines = summary.splitlines()
    floor = [
        line for line in lines if "positive perturbation AUC of" in line and "< random" in line
    ]
    assert len(floor) == 2 * 4  # every method but random, each modality
    assert all(line.startswith(("- holds: ", "- **does not hold**: ")) for line in floor)
    assert any("do not apply: this model is single_stream" in line for line in lines)

    # A finished block is kept: removing one block's file recomputes only that block.
    kept = (tmp_path / "shards" / "vqa-0000.json").read_text()
    (tmp_path / "shards" / "vqa-0002.json").unlink()
    assert table.main(argv) == 0
    assert (tmp_path / "shards" / "vqa-0000.json").read_text() == kept
    assert (tmp_path / "shards" / "vqa-0002.json").exists()
    # Blocks remember their plan; a classifier's parts are not a VQA model's.
    with pytest.raises(SystemExit):
        table.main([*argv, "--methods", "random,generic"])
    with pytest.raises(SystemExit):
        table.main([*argv, "--parts", "single"])


def _result(aucs: dict[tuple[str, str, str], float]) -> EvaluationResult:
    """A result whose statistics are ``aucs`` with a 95 % half-width of 1."""
    results: dict[tuple[str, str], list[Statistic]] = {}
    for (method, metric, name), mean in aucs.items():
        stat = Statistic(name, mean, 10.0, mean - 1, mean + 1, 100)
        results.setdefault((method, metric), []).append(stat)
    return EvaluationResult("lxmert", "synthetic_vqa:100:0", tuple(
        MetricResult(m, k, tuple(v), ()) for (m, k), v in results.items()))  # fmt: skip


def test_two_stream_orderings_hold_or_not_with_their_numbers() -> None:
    vqa = _script().vqa_orderings
    image, text = "perturbation_image", "perturbation_text"
    aucs = {
        ("random", image, "positive_auc"): 50.0, ("random", text, "positive_auc"): 40.0,
        ("generic", image, "positive_auc"): 20.0, ("generic", image, "negative_auc"): 70.0,
        ("generic+lrp", image, "positive_auc"): 10.0, ("generic+lrp", image, "negative_auc"): 90.0,
        ("rollout", image, "positive_auc"): 30.0, ("rollout", image, "negative_auc"): 75.0,
        ("generic", text, "positive_auc"): 30.0, ("generic", text, "negative_auc"): 60.0,
        ("transformer_attribution", text, "positive_auc"): 31.5,
        ("transformer_attribution", text, "negative_auc"): 57.0,
        ("rollout", text, "positive_auc"): 45.0,
    }  # fmt: skip
    rows = ["random", "rollout", "transformer_attribution", "generic", "generic+lrp"]
    lines = vqa(_result(aucs), rows, "two_stream")
    assert "- holds: image positive perturbation AUC of generic 20.0 [19.0, 21.0] < random " \
        "50.0 [49.0, 51.0] (95 % intervals apart)" in lines  # fmt: skip
    assert any(line.startswith("- **does not hold**: text positive perturbation AUC of rollout")
               for line in lines)  # fmt: skip
    # generic+lrp is generic's own variant, not a rival; rollout is
    assert "- holds: generic lowest image positive perturbation AUC, 20.0 [19.0, 21.0]; best of " \
        "the other methods: rollout 30.0 [29.0, 31.0]" in lines  # fmt: skip
    assert any(line.startswith("- **does not hold**: generic highest image negative")
               and "rollout 75.0" in line for line in lines)  # fmt: skip
    assert "- holds: generic near transformer_attribution on text positive perturbation: 30.0 " \
        "[29.0, 31.0] vs 31.5 [30.5, 32.5], difference -1.5" in lines  # fmt: skip
    assert any(line.startswith("- **does not hold**: generic near transformer_attribution on text "
                               "negative") for line in lines)  # fmt: skip
    assert not any("do not apply" in line for line in lines)
