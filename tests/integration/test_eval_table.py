"""scripts/eval_table.py: blocks over a real `vitlens serve`, resumable, merged exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vitlens.evaluation import EvaluationResult

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("eval_table", ROOT / "scripts" / "eval_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blocks_merge_into_the_report_and_a_rerun_resumes(tmp_path) -> None:
    table = _script()
    argv = ["--scenes", "3", "--block", "2", "--methods", "oracle,random", "--out", str(tmp_path)]
    argv += ["--threads", "1"]
    assert table.main(argv) == 0
    shards = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert shards == [f"{part}-{s:04d}.json" for part in ("single", "two_object") for s in (0, 2)]
    summary = (tmp_path / "README.md").read_text()
    assert "## single: `synthetic:3:0`, 2 methods" in summary
    assert "- holds: oracle best on IoU (best: oracle, 1.000)" in summary
    merged = EvaluationResult.from_dict(json.loads((tmp_path / "single/results.json").read_text()))
    iou = merged.get("oracle", "segmentation").value("iou")
    assert iou.n == 3 and iou.mean == pytest.approx(1.0)
    assert merged.get("oracle", "sanity").value("spearman").mean == pytest.approx(1.0)
    assert EvaluationResult.from_dict(json.loads(merged.to_json())) == merged

    # A finished block is kept: removing one block's file recomputes only that block.
    kept = (tmp_path / "shards" / "single-0000.json").read_text()
    (tmp_path / "shards" / "single-0002.json").unlink()
    assert table.main(argv) == 0
    assert (tmp_path / "shards" / "single-0000.json").read_text() == kept
    assert (tmp_path / "shards" / "single-0002.json").exists()

    # Blocks remember the served weights: a block of other weights stops a resumed run.
    shard = tmp_path / "shards" / "two_object-0000.json"
    record = json.loads(shard.read_text())
    assert len(record["weights_sha256"]) == 64
    shard.write_text(json.dumps(record | {"weights_sha256": "0" * 64}))
    (tmp_path / "shards" / "single-0002.json").unlink()
    with pytest.raises(SystemExit):
        table.main(argv)
    assert not (tmp_path / "shards" / "single-0002.json").exists()
    shard.write_text(json.dumps(record))

    # Blocks remember their plan: other metric options need another output folder.
    inpaint = ["--metric-option", "perturbation.baseline=inpaint"]
    with pytest.raises(SystemExit):
        table.main([*argv, *inpaint])
    other = tmp_path / "inpaint"
    argv = ["--scenes", "2", "--block", "2", "--methods", "oracle,random", "--threads", "1"]
    argv += ["--parts", "single", "--metrics", "perturbation", "--out", str(other), *inpaint]
    assert table.main(argv) == 0
    record = json.loads((other / "shards" / "single-0000.json").read_text())
    assert record["plan"]["options"] == {"perturbation": {"baseline": "inpaint"}}
    assert [r["metric"] for r in record["results"]] == ["perturbation"] * 2
    assert "options: `perturbation.baseline=inpaint`" in (other / "README.md").read_text()
