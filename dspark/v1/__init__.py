"""Generated code of the dspark.v1 protobuf API (proto/dspark/v1/dspark.proto; scripts/gen_proto.sh)."""
