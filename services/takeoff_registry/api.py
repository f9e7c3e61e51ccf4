"""gRPC servicers of the registry: JobService and RunService.

Thin by design: each method converts the request to domain calls and the result back to protos. Methods
not written yet are inherited from the generated base, which the error interceptor answers with
UNIMPLEMENTED naming the method.
"""

from takeoff.v1 import jobs_pb2_grpc, runs_pb2_grpc


class JobApi(jobs_pb2_grpc.JobServiceServicer):
    """Jobs, versions, aliases and artifacts."""


class RunApi(runs_pb2_grpc.RunServiceServicer):
    """Runs: config, metrics, summary, logs and state."""
