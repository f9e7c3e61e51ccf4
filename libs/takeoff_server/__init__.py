"""What every Takeoff server shares: config, the gRPC bootstrap, errors, database and telemetry."""
