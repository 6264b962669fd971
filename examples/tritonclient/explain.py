"""Explain a batch of images with vitlens through Triton's own client.

vitlens serves the Open Inference Protocol (KServe v2 / Triton gRPC) beside its own API, so
the tools ML platforms already run against Triton or KServe work unchanged. This script is
all it takes with ``tritonclient[grpc]``:

    python3 -m venv build/oip-venv
    build/oip-venv/bin/pip install -r examples/tritonclient/requirements.txt
    build/oip-venv/bin/python examples/tritonclient/explain.py --url localhost:50051

It checks that the server and model are ready, reads the model's metadata, sends a batch of
images (random ones unless ``--images`` names an .npy file of NxHxWx3 uint8 pixels) with the
parameters ``method`` and ``target``, and prints a JSON summary on stdout. ``--save`` also
writes the output tensors to an .npz file. The tensors are described in docs/oip.md.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

OUTPUTS = ("PROBABILITIES", "HEATMAP", "TARGET")


def image_input(pixels: np.ndarray, datatype: str) -> grpcclient.InferInput:
    """The IMAGE tensor of (N, H, W, 3) uint8 ``pixels`` as UINT8, FP32 (0..1) or BYTES (PNG)."""
    if datatype == "UINT8":
        data = pixels
    elif datatype == "FP32":
        data = pixels.astype(np.float32) / 255
    else:  # BYTES: one encoded image file per element
        data = np.array([png(image) for image in pixels], dtype=np.object_)
    tensor = grpcclient.InferInput("IMAGE", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:50051", help="host:port of vitlens")
    parser.add_argument("--model", default="vitlens-demo")
    parser.add_argument("--method", default="generic", help="explanation method")
    parser.add_argument("--target", type=int, help="class to explain (default: the predicted)")
    parser.add_argument("--datatype", choices=("UINT8", "FP32", "BYTES"), default="UINT8")
    parser.add_argument("--images", help=".npy file of NxHxWx3 uint8 pixels")
    parser.add_argument("--batch", type=int, default=8, help="random images, without --images")
    parser.add_argument("--save", help="write the output tensors to this .npz file")
    args = parser.parse_args(argv)

    client = grpcclient.InferenceServerClient(url=args.url)
    if not (client.is_server_live() and client.is_model_ready(args.model)):
        raise SystemExit(f"{args.model} on {args.url} is not ready")
    metadata = client.get_model_metadata(args.model, as_json=True)

    if args.images:
        pixels = np.load(args.images)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), np.uint8)
    parameters = {"method": args.method}
    if args.target is not None:
        parameters["target"] = args.target

    started = time.perf_counter()
    result = client.infer(
        args.model,
        inputs=[image_input(pixels, args.datatype)],
        outputs=[grpcclient.InferRequestedOutput(name) for name in OUTPUTS],
        parameters=parameters,
        request_id="tritonclient-example",
    )
    seconds = time.perf_counter() - started

    tensors = {name: result.as_numpy(name) for name in OUTPUTS}
    if args.save:
        np.savez(args.save, **tensors)
    response = result.get_response()
    summary = {
        "model": response.model_name,
        "method": response.parameters["method"].string_param,
        "id": response.id,
        "inputs": [{"name": t["name"], "datatype": t["datatype"]} for t in metadata["inputs"]],
        "shapes": {name: list(array.shape) for name, array in tensors.items()},
        "predicted": tensors["PROBABILITIES"].argmax(axis=1).tolist(),
        "targets": tensors["TARGET"].tolist(),
        "seconds": round(seconds, 4),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
