"""Client-side plumbing shared by the SDK and every service: channels (:mod:`~takeoff_rpc.channels`),
retries (:mod:`~takeoff_rpc.backoff`, :mod:`~takeoff_rpc.retries`), error decoding
(:mod:`~takeoff_rpc.status`).

It imports neither the SDK (``takeoff``) nor the server runtime (``takeoff_server``): both build on it.
Importing the package loads nothing: a launched job that reaches the registry through its agent's relay
uses the gRPC-free modules alone and never pays for gRPC's import.
"""
