"""Generated protobuf/gRPC modules (scripts/gen_proto.sh); not committed."""
