"""vitlens against the libraries people call instead: same model, same images, interleaved rounds.

    PYTHONPATH=client:server:. python scripts/bench_peers.py --threads 2
    PYTHONPATH=client:server:. python scripts/bench_peers.py --model vit_base_patch16_224 \\
        --device cuda --batch 16

Each task explains the same B images for each image's predicted class, once per contestant per
round; rounds interleave the contestants, and the ratio peer seconds ÷ vitlens seconds is taken
within each round (> 1: vitlens is faster). vitlens runs in process (`Explainer.explain_batch`)
and over gRPC (the SDK against `vitlens serve` on loopback, result cache off, its images sent as
uint8 pixels). The peers (`make peers` installs them; the server never imports them):

- pytorch-grad-cam `GradCAM` on the last block's first norm, its documented ViT recipe, vs
  vitlens `gradcam` (attention Grad-CAM, METHODS.md): different maps, the same passes
  (one forward, one backward).
- captum `IntegratedGradients` (right Riemann sum, black baseline, the same steps), called as
  its documentation shows (all steps in one batch) and with ``internal_batch_size`` set to the
  images of vitlens' passes, vs vitlens `saliency` mode integrated_gradients; the maps must agree
  (max over channels of |attribution|), and the script reports how closely.
- captum `NoiseTunnel(Saliency)` SmoothGrad vs vitlens `saliency` mode smoothgrad (the same
  samples and σ; different noise draws).
- lxt's AttnLRP (CP-LRP in the attention, lxt's rules for LayerNorm and GELU, input x gradient)
  on a copy of the model vs vitlens `transformer_attribution` (Chefer et al.'s LRP).
- Chefer et al.'s reference code (github.com/hila-chefer/Transformer-Explainability) has no
  package on PyPI, so it cannot be installed here; it is reported as not run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import vitlens
from vitlens_server.bench.malloc import add_malloc_flag, apply_malloc_flag
from vitlens_server.bench.process import ServeProcess
from vitlens_server.bench.report import replace_section
from vitlens_server.explain import Explainer, ExplainJob, TargetSpec, get_method
from vitlens_server.explain.params import parse_params
from vitlens_server.models import LoadedModel, ModelSpec, load_model
from vitlens_server.models.default import DEMO_MODEL_NAME, demo_spec

ROOT = Path(__file__).resolve().parents[1]
TA_TASK = "Transformer Attribution (α1β0 LRP + gradients)"
Run = Callable[[], object]


class Normalised(nn.Module):
    """A copy of the model on pixels in [0, 1]: what the peers are given, so every contestant
    starts from the same pixels and normalises them the same way. The copy's parameters
    require gradients, as a model fresh from ``timm.create_model`` does (pytorch-grad-cam
    builds its graph from them; vitlens' copy is frozen)."""

    def __init__(self, model: LoadedModel, module: nn.Module | None = None) -> None:
        super().__init__()
        self.module = copy.deepcopy(model.module if module is None else module)
        self.module.requires_grad_(True)
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(model.mean, device=model.device).view(shape))
        self.register_buffer("std", torch.tensor(model.std, device=model.device).view(shape))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.module((pixels - self.mean) / self.std)


def lxt_rules() -> types.ModuleType:
    """lxt 2.1's efficient AttnLRP rules. Its package ``__init__`` imports Hugging Face BERT
    patches that need transformers < 5; the rules themselves do not, so the package is
    registered bare and ``lxt.efficient.patches`` imported from its own file."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or spec.origin is None:
        raise ImportError("lxt is not installed (make peers)")
    efficient = types.ModuleType("lxt.efficient")
    efficient.__path__ = [str(Path(spec.origin).parent / "efficient")]
    sys.modules.setdefault("lxt.efficient", efficient)
    import lxt.efficient.patches as patches

    return patches


def attnlrp_model(model: nn.Module) -> nn.Module:
    """A copy of the timm ViT with lxt's CP-LRP rules: no gradient through q and k (lxt's
    ``cp_multi_head_attention_forward``, here after timm's ``q_norm``/``k_norm``, so timm's own
    fused attention runs), lxt's ``layer_norm_forward`` and ``non_linear_forward`` on every
    LayerNorm and GELU."""
    patches = lxt_rules()
    from timm.layers import Attention

    class StopGradient(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return patches.stop_gradient(self.inner(x))

    lrp = copy.deepcopy(model)
    for module in list(lrp.modules()):
        if isinstance(module, Attention):
            module.q_norm, module.k_norm = StopGradient(module.q_norm), StopGradient(module.k_norm)
        elif isinstance(module, nn.LayerNorm):
            module.forward = types.MethodType(patches.layer_norm_forward, module)
        elif isinstance(module, nn.GELU):
            module.original_forward = module.forward
            module.forward = types.MethodType(patches.non_linear_forward, module)
    return lrp


def vit_reshape(tokens: Tensor, grid: tuple[int, int], prefix: int) -> Tensor:
    """pytorch-grad-cam's ViT recipe: (B, N, D) tokens → (B, D, gh, gw) without the prefix."""
    patches = tokens[:, prefix:].reshape(tokens.shape[0], *grid, tokens.shape[2])
    return patches.permute(0, 3, 1, 2)


def vitlens_call(explainer: Explainer, pixels: Tensor, method: str, options: dict) -> Run:
    spec = get_method(method)
    params = parse_params(spec.params, options, method=method)
    job = ExplainJob(pixels=pixels, method=spec, params=params, target=TargetSpec())
    return lambda: explainer.explain_batch([job])


def grpc_call(client: vitlens.Client, model: str, images: list, method: str, options: dict) -> Run:
    return lambda: client.explain(
        images, model=model, method=method, method_options=options or None
    )


@dataclass(frozen=True)
class Case:
    """What every contestant explains: ``pixels`` (B, C, H, W) in [0, 1] and their predicted
    ``targets`` (B,), the model wrapped for the peers, and the images as the SDK sends them."""

    model: LoadedModel
    pixels: Tensor
    targets: Tensor
    wrapped: Normalised
    images: list[np.ndarray]


def gradcam_peers(case: Case) -> dict[str, Run]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    geometry = case.model.geometry
    cam = GradCAM(
        model=case.wrapped,
        target_layers=[case.wrapped.module.blocks[-1].norm1],
        reshape_transform=lambda t: vit_reshape(t, geometry.grid, geometry.num_prefix_tokens),
    )
    targets = [ClassifierOutputTarget(int(t)) for t in case.targets]
    return {"pytorch-grad-cam GradCAM": lambda: cam(input_tensor=case.pixels, targets=targets)}


def ig_peers(case: Case, steps: int, rows: int) -> dict[str, Run]:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(case.wrapped)
    black = torch.zeros_like(case.pixels)

    def attribute(batch: int | None) -> Run:
        return lambda: ig.attribute(
            case.pixels,
            black,
            target=case.targets,
            n_steps=steps,
            method="riemann_right",
            internal_batch_size=batch,
        )

    return {
        "captum IntegratedGradients": attribute(None),
        f"captum IntegratedGradients, internal_batch_size={rows}": attribute(rows),
    }


def smoothgrad_peers(case: Case) -> dict[str, Run]:
    from captum.attr import NoiseTunnel, Saliency

    smooth = NoiseTunnel(Saliency(case.wrapped))
    return {
        "captum NoiseTunnel(Saliency)": lambda: smooth.attribute(
            case.pixels, nt_type="smoothgrad", nt_samples=25, stdevs=0.15, target=case.targets
        )
    }


def lxt_peers(case: Case) -> dict[str, Run]:
    lrp = Normalised(case.model, attnlrp_model(case.model.module))

    def attnlrp() -> Tensor:
        x = case.pixels.detach().requires_grad_(True)
        logits = lrp(x)
        (grad,) = torch.autograd.grad(logits.gather(1, case.targets[:, None]).sum(), x)
        return (x * grad).sum(1)  # (B, H, W) relevance, lxt's input x gradient

    return {"lxt AttnLRP (CP-LRP)": attnlrp}


def tasks(
    case: Case, explainer: Explainer, client: vitlens.Client | None, steps: int
) -> tuple[dict[str, dict[str, Run]], dict[str, str]]:
    """Per task: contestant → a call explaining the case for its predicted classes; and per
    task, the peers that could not be imported (the task then runs vitlens alone)."""
    ig_options = {"mode": "integrated_gradients", "steps": steps}
    sg_options = {"mode": "smoothgrad", "samples": 25, "noise": 0.15}
    rows = explainer.max_pass_rows
    peers: dict[str, tuple[Callable[[], dict[str, Run]], str, dict]] = {
        "Grad-CAM": (lambda: gradcam_peers(case), "gradcam", {}),
        f"Integrated Gradients ({steps} steps)": (
            lambda: ig_peers(case, steps, rows),
            "saliency",
            ig_options,
        ),
        "SmoothGrad (25 samples)": (lambda: smoothgrad_peers(case), "saliency", sg_options),
        "LRP in one forward + one backward": (lambda: lxt_peers(case), "generic", {}),
        TA_TASK: (dict, "transformer_attribution", {}),
    }
    plan: dict[str, dict[str, Run]] = {}
    missing: dict[str, str] = {}
    for task, (build, method, options) in peers.items():
        try:
            runs = build()
        except ImportError as err:  # that library is not installed: vitlens alone
            runs, missing[task] = {}, str(err)
        label = f"vitlens {method}" + (f" ({options['mode']})" if "mode" in options else "")
        runs[label] = vitlens_call(explainer, case.pixels, method, options)
        if client is not None:
            runs[f"{label}, gRPC"] = grpc_call(
                client, case.model.name, case.images, method, options
            )
        plan[task] = runs
    return plan, missing


def ig_agreement(case: Case, explainer: Explainer, steps: int) -> float | None:
    """Largest |vitlens − captum| of the IG maps (max over channels of |attribution|), relative
    to the largest map value: the two compute the same thing. None without captum."""
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        return None
    attr = IntegratedGradients(case.wrapped).attribute(
        case.pixels,
        torch.zeros_like(case.pixels),
        target=case.targets,
        n_steps=steps,
        method="riemann_right",
    )
    theirs = attr.abs().amax(1).cpu()
    spec = get_method("saliency")
    options = {"mode": "integrated_gradients", "steps": steps}
    params = parse_params(spec.params, options, method="saliency")
    job = ExplainJob(case.pixels, spec, params, TargetSpec(), grid="native")
    ours = torch.from_numpy(explainer.explain(job).heatmaps[:, 0])
    return float((ours - theirs).abs().max() / theirs.abs().max())


def measure(plan: dict[str, dict[str, Run]], rounds: int, device: torch.device) -> dict:
    """Seconds of each contestant per round (after one warm-up call each), interleaved."""
    for runs in plan.values():
        for run in runs.values():
            run()
    seconds: dict[str, dict[str, list[float]]] = {
        t: {c: [] for c in runs} for t, runs in plan.items()
    }
    for round_ in range(rounds):
        for task, runs in plan.items():
            for name, run in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[task][name].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    return seconds


def markdown(
    seconds: dict, batch: int, env: str, agreement: float | None, missing: dict[str, str]
) -> str:
    lines = [
        f"{env}. B = {batch} images a call, each explained for its predicted class; seconds are "
        "medians over the rounds; \"vitlens x\" is the peer's seconds ÷ vitlens' seconds in the "
        "same round (in process, or over gRPC for the gRPC rows), median [min, max] over rounds.",
        "",
        "| task | contestant | s per call | images/s | vitlens x (in process) | vitlens x (gRPC) |",
        "|---|---|---|---|---|---|",
    ]
    for task, runs in seconds.items():
        ours = next(
            v for k, v in runs.items() if k.startswith("vitlens") and not k.endswith("gRPC")
        )
        remote = next((v for k, v in runs.items() if k.endswith("gRPC")), None)
        for name, times in runs.items():
            median = statistics.median(times)
            cells = ["", ""]
            if not name.startswith("vitlens"):
                cells = [_ratios(times, ours), _ratios(times, remote) if remote else "—"]
            rate = batch / median
            lines.append(
                f"| {task} | {name} | {median:.3f} | {rate:.2f} | {cells[0]} | {cells[1]} |"
            )
        if task in missing:
            lines.append(f"| {task} | peer not run: {missing[task]} | | | | |")
        if task == TA_TASK:
            lines.append(
                f"| {task} | Chefer et al.'s code | not run: no PyPI package (GitHub only) | | | |"
            )
    if agreement is not None:
        lines += [
            "",
            f"vitlens' and captum's Integrated Gradients maps agree to {agreement:.1e} of the "
            "largest map value (the same right Riemann sum from the black image).",
        ]
    return "\n".join(lines) + "\n"


def _ratios(peer: list[float], ours: list[float]) -> str:
    ratios = [p / o for p, o in zip(peer, ours, strict=True)]
    return f"**{statistics.median(ratios):.2f}x** [{min(ratios):.2f}, {max(ratios):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, or a timm architecture name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="images a call")
    parser.add_argument("--steps", type=int, default=32, help="Integrated Gradients steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads here and in the server"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="vitlens' images a pass")
    parser.add_argument("--no-grpc", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers")
    parser.add_argument("--no-benchmarks-md", action="store_true")
    add_malloc_flag(
        parser, "; written to files of their own (STEM-glibc-malloc), not to BENCHMARKS.md"
    )
    args = parser.parse_args()
    malloc = apply_malloc_flag(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.model in ("demo", DEMO_MODEL_NAME):
        model = load_model(demo_spec(args.device))
    else:
        model = load_model(ModelSpec(name=args.model, architecture=args.model, device=args.device))
    pixels = torch.rand(
        (args.batch, *model.geometry.input_size), generator=torch.Generator().manual_seed(0)
    )
    pixels = ((pixels * 255).round() / 255).to(model.device)  # exactly what uint8 on the wire gives
    explainer = Explainer(model, max_pass_rows=args.max_batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{model.device.type}-{model.name}"
    if args.return_freed_memory:  # its own files, beside the table of what the server runs
        stem += "-glibc-malloc"
    server = None
    if not args.no_grpc:
        flags = ["--cache-mb", "0", "--device", args.device]
        if args.return_freed_memory:
            flags.append("--return-freed-memory")
        flags += ["--max-batch-size", str(args.max_batch_size)]
        if args.threads:
            flags += ["--threads", str(args.threads)]
        if args.model not in ("demo", DEMO_MODEL_NAME):
            flags += ["--model", f"{model.name}={args.model}:random"]
        server = ServeProcess.start(flags, log=args.out / f"{stem}-serve.log")
    try:
        client = None
        if server is not None:
            server.wait_serving(timeout_s=600)
            client = vitlens.Client(server.address, timeout_s=600)
        wrapped = Normalised(model).eval()
        with torch.no_grad():
            targets = wrapped(pixels).argmax(1)
        wire = (pixels * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        case = Case(model, pixels, targets, wrapped, [np.ascontiguousarray(p) for p in wire])
        plan, missing = tasks(case, explainer, client, args.steps)
        agreement = ig_agreement(case, explainer, args.steps)
        seconds = measure(plan, args.rounds, model.device)
    finally:
        if server is not None:
            server.stop()
    env = (
        f"Model {model.name} ({model.spec.architecture}) on {model.device}; "
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if model.device.type == "cuda" else "")
        + f", host malloc {malloc}"
        + f"; {args.rounds} interleaved rounds"
    )
    body = markdown(seconds, args.batch, env, agreement, missing)
    print(body)
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {"env": env, "batch": args.batch, "seconds": seconds, "ig_agreement": agreement},
            indent=2,
        )
        + "\n"
    )
    (args.out / f"{stem}.md").write_text(f"# vitlens and its peers: {stem}\n\n{body}")
    if not (args.no_benchmarks_md or args.return_freed_memory):
        path = ROOT / "BENCHMARKS.md"
        command = (
            "Command: `PYTHONPATH=client:server:. python scripts/bench_peers.py "
            f"--model {args.model} --device {args.device} --batch {args.batch}"
            + (f" --threads {args.threads}" if args.threads else "")
            + "`\n\n"
        )
        title = f"## vitlens and its peers · {model.name} · {model.device}\n\n"
        path.write_text(replace_section(path.read_text(), f"peers {stem}", title + command + body))


if __name__ == "__main__":
    main()
