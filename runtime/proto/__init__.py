"""Generated protobuf code of the KServe v2 gRPC API that the node serves (grpc_inference.proto;
its header says how to regenerate it). runtime/grpc_protocol.py is the only importer."""
