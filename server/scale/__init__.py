"""Several replicas of the server on Ray Serve, sharing one registry (docs/scale-out.md)."""
