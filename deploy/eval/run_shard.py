"""One shard of a sharded Evaluate run: the body of each pod of the Indexed Job.

The Job (deploy/k8s/eval/job-shards.yaml) runs ``COUNT`` pods; pod ``INDEX`` (Kubernetes sets
``JOB_COMPLETION_INDEX``) evaluates its own contiguous block of the held-out synthetic scenes
of ``synthetic:TOTAL:SEED`` and writes the result JSON of ``vitlens evaluate --json`` to
``$EVAL_OUT_DIR/shard-INDEX-of-COUNT.json`` (written under a temporary name, then renamed, so a
half-written file is never merged).

Why this is the same dataset, not merely "more scenes": ``synthetic:N:S`` is the scenes with
seeds ``TEST_OFFSET + S + j`` for ``j = 0..N-1`` (``split_seeds("test", N, base_seed=S)``), and a
scene is a function of its seed alone. So the blocks ``synthetic:n_i:S + start_i`` with
``start_i = Σ_{k<i} n_k`` are exactly the scenes of ``synthetic:TOTAL:S``, each once
(tests/integration/test_deploy.py checks this against the server's dataset code).
``Dataset.limit`` only truncates, so it cannot express a block that does not start at 0.

Environment: EVAL_TOTAL (scenes in all), EVAL_SHARDS (= the Job's completions), EVAL_SEED (0),
EVAL_TWO_OBJECT ("true" for two-object scenes), EVAL_METHODS, EVAL_METRICS (comma-separated),
EVAL_SERVER (host:port), EVAL_MODEL (""), EVAL_TIMEOUT_S (86400), EVAL_OUT_DIR (/results),
EVAL_EXPLAIN_LABEL ("true" to explain the label), JOB_COMPLETION_INDEX.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["evaluate_command", "shard_block", "shard_dataset", "shard_file_name"]


# `vitlens` with the interpreter running this script (the image's venv), console script or not.
VITLENS = [sys.executable, "-m", "vitlens.cli"]


def shard_block(total: int, count: int, index: int) -> tuple[int, int]:
    """``(start, size)`` of block ``index`` of ``count`` near-equal blocks of ``range(total)``.

    The first ``total % count`` blocks get one scene more; the blocks tile ``range(total)``.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index must be in 0..{count - 1}, got {index}")
    if total < count:
        raise ValueError(f"{total} scenes cannot be split into {count} non-empty shards")
    base, extra = divmod(total, count)
    return index * base + min(index, extra), base + (index < extra)


def shard_dataset(
    total: int, count: int, index: int, seed: int = 0, two_object: bool = False
) -> str:
    """The ``synthetic:N:SEED[:two_object]`` spec of shard ``index`` of ``synthetic:total:seed``."""
    start, size = shard_block(total, count, index)
    return f"synthetic:{size}:{seed + start}" + (":two_object" if two_object else "")


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index:04d}-of-{count:04d}.json"


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes"}


def evaluate_command(env: Mapping[str, str], out_file: Path) -> list[str]:
    """The ``vitlens evaluate`` command line of the shard described by ``env``."""
    total, count = int(env["EVAL_TOTAL"]), int(env["EVAL_SHARDS"])
    index = int(env["JOB_COMPLETION_INDEX"])
    dataset = shard_dataset(
        total, count, index, int(env.get("EVAL_SEED", "0")), _flag(env, "EVAL_TWO_OBJECT")
    )
    command = [
        *VITLENS,
        "evaluate",
        "--server",
        env["EVAL_SERVER"],
        "--methods",
        env["EVAL_METHODS"],
        "--metrics",
        env["EVAL_METRICS"],
        "--dataset",
        dataset,
        "--timeout-s",
        env.get("EVAL_TIMEOUT_S", "86400"),
        "--json",
        str(out_file),
        "--quiet",
    ]
    if env.get("EVAL_MODEL"):
        command += ["--model", env["EVAL_MODEL"]]
    if _flag(env, "EVAL_EXPLAIN_LABEL"):
        command.append("--explain-label")
    return command


def main() -> int:
    env = dict(os.environ)
    index, count = int(env["JOB_COMPLETION_INDEX"]), int(env["EVAL_SHARDS"])
    out_dir = Path(env.get("EVAL_OUT_DIR", "/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / shard_file_name(index, count)
    partial = final.with_suffix(".json.partial")
    command = evaluate_command(env, partial)
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command, check=False).returncode
    if code == 0:
        os.replace(partial, final)
        print(f"shard {index}/{count}: wrote {final}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
