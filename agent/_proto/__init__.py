"""Generated gRPC/protobuf code only."""
