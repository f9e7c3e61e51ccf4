"""Client-side plumbing shared by the SDK and every service: channels, retries, error decoding.

It imports neither the SDK (``takeoff``) nor the server runtime (``takeoff_server``): both build on it.
"""

from takeoff_rpc.channels import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, open_aio_channel, open_channel
from takeoff_rpc.retries import TRANSIENT_CODES, RetryPolicy, call_with_retries, call_with_retries_async
from takeoff_rpc.status import FieldViolation, RpcStatus, decode_rpc_error, status_code

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "TRANSIENT_CODES",
    "FieldViolation",
    "RetryPolicy",
    "RpcStatus",
    "call_with_retries",
    "call_with_retries_async",
    "decode_rpc_error",
    "open_aio_channel",
    "open_channel",
    "status_code",
]
