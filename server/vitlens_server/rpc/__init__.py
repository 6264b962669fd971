"""The gRPC face of the server: decode → data plane → encode. The only package importing grpc.

Never imports torch or `explain`: it speaks to the data plane through `runtime.api`.
"""
