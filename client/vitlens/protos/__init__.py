"""The vitlens contract's ``.proto`` files, shipped with the SDK.

This folder is the **import root**: the files are ``vitlens/v1/vitlens.proto`` and
``vitlens/v1/tensor.proto`` below it and import each other by those paths, so generate code for
any language by pointing the generator here::

    python -m grpc_tools.protoc -I"$(python -c 'import vitlens.protos as p; print(p.ROOT)')" \\
        --python_out=. vitlens/v1/vitlens.proto vitlens/v1/tensor.proto

They are a copy of the repository's top-level ``protos/`` made by ``scripts/gen_protos.sh``
(``make protos``); ``tests/unit/test_protos.py`` checks that the copy is identical.
"""

from pathlib import Path

__all__ = ["ROOT"]

ROOT = Path(__file__).resolve().parent
