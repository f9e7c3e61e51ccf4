"""gRPC servicer of the builder: builds with streamed events, and their records.

Thin by design: requests become domain calls, results become protos. Methods not written yet are
inherited from the generated base, which the error interceptor answers with UNIMPLEMENTED.
"""

from takeoff.v1 import build_pb2_grpc


class BuildApi(build_pb2_grpc.BuildServiceServicer):
    """Venv, image and noop builds."""
