"""Transport security and authentication: TLS / mutual TLS credentials, bearer tokens.

Tokens are compared in constant time against every configured token (so neither a match's
position nor its prefix leaks through timing); the health and reflection services stay open so
probes and tooling work without credentials.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path

import grpc

from vitlens_server.errors import Unauthenticated

__all__ = ["BearerTokenAuth", "read_tokens", "server_credentials"]

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """Tokens from a file, one per line; blank lines and comment lines (``#`` after optional
    indentation) are ignored, and a token never holds whitespace."""
    tokens = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if any(c.isspace() for c in text):
            raise ValueError(f"{path}, line {number}: a token cannot contain whitespace")
        tokens.append(text.encode())
    tokens = tuple(tokens)
    if not tokens:
        raise ValueError(f"{path} holds no tokens")
    return tokens


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS with ``cert``/``key``; with ``client_ca`` clients must present a certificate it
    signed (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=None if client_ca is None else Path(client_ca).read_bytes(),
        require_client_auth=client_ca is not None,
    )


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health and reflection."""

    def __init__(self, tokens: Sequence[bytes]) -> None:
        if not tokens:
            raise ValueError("at least one token is required")
        self._tokens = tuple(tokens)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(EXEMPT_PREFIXES) or self._allowed(details):
            return await continuation(details)
        handler = await continuation(details)
        return _refusal(handler)

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        scheme, _, token = (header if isinstance(header, str) else header.decode()).partition(" ")
        given = token.strip().encode()
        matched = False
        for expected in self._tokens:  # every token is compared: no early exit
            matched |= hmac.compare_digest(given, expected)
        return scheme.lower() == "bearer" and matched


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """A handler of the same shape that raises UNAUTHENTICATED (mapped, like every domain
    error, by `rpc.interceptor.CallInterceptor`, which runs outside this interceptor)."""
    if handler is None:
        return None
    message = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"

    async def unary(_request, _context):
        raise Unauthenticated(message)

    async def stream(_request, _context):
        raise Unauthenticated(message)
        yield  # unreachable; makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
