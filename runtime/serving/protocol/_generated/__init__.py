"""Stubs generated from ../grpc_predict_v2.proto by grpcio-tools (see runtime/serving/protocol/__init__.py)."""
