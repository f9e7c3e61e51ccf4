"""gRPC servicer of the queue service: queues, items, agents and the Lease stream.

Thin by design: requests become domain calls, results become protos. Methods not written yet are
inherited from the generated base, which the error interceptor answers with UNIMPLEMENTED.
"""

from takeoff.v1 import queue_pb2_grpc


class QueueApi(queue_pb2_grpc.QueueServiceServicer):
    """Queues, enqueue, items, agents and the Lease stream."""
