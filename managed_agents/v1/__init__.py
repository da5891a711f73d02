"""Generated protobuf and gRPC stubs of the managed_agents.v1 contracts. @generated"""
