"""The REST/gRPC edge: the generated Envoy config, and helpers for the compose deployment."""
