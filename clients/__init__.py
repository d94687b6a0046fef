"""Python clients for propserve (gRPC and REST): they speak only the wire."""
