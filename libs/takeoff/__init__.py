"""Takeoff: launch machine-learning jobs and track their runs.

The SDK talks to Takeoff's services over gRPC only; it never imports server code.
"""

__version__ = "0.1.0"
