"""Client mistakes through tritonclient (run by tests/rpc/test_oip.py in build/oip-venv).

Prints a JSON object: for each case, the InferenceServerException's status and message (or
"OK" for the good request sent last, which shows the server still serves).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def infer(client, model="vitlens-demo", datatype="UINT8", output="PROBABILITIES", **params):
    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    tensor = grpcclient.InferInput("IMAGE", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels.astype(np.int64) if datatype == "INT64" else pixels)
    outputs = [grpcclient.InferRequestedOutput(output)]
    return client.infer(model, [tensor], outputs=outputs, parameters=params or None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    client = grpcclient.InferenceServerClient(url=args.url)
    cases = {
        "model_ready_unknown_model": lambda: client.is_model_ready("nope"),
        "metadata_unknown_model": lambda: client.get_model_metadata("nope"),
        "infer_unknown_model": lambda: infer(client, model="nope"),
        "infer_bad_datatype": lambda: infer(client, datatype="INT64"),
        "infer_unknown_parameter": lambda: infer(client, steps=3),
        "infer_unknown_output": lambda: infer(client, output="LOGITS"),
        "infer_bad_target": lambda: infer(client, method="generic", target=99),
        "infer_good": lambda: infer(client),
    }
    outcomes = {}
    for name, call in cases.items():
        try:
            call()
            outcomes[name] = {"status": "OK", "message": ""}
        except InferenceServerException as err:
            outcomes[name] = {"status": err.status(), "message": err.message()}
    print(json.dumps(outcomes, indent=2))


if __name__ == "__main__":
    main()
