"""Open Inference Protocol v2: REST (rest.py, codec.py) and gRPC (grpc_service.py).

The gRPC stubs in _generated/ are generated from grpc_predict_v2.proto and committed; regenerate with
    cd runtime/serving/protocol && python -m grpc_tools.protoc -I. --python_out=_generated \
        --grpc_python_out=_generated grpc_predict_v2.proto
then change the generated `import grpc_predict_v2_pb2` into `from . import grpc_predict_v2_pb2` and put
`# mypy: ignore-errors` on the first line of both files.
"""
