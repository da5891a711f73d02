"""The session store: a durable, append-only event log per agent session, served over gRPC."""
