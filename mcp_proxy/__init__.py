"""The security boundary: a write-only credential vault and a proxy to MCP servers and git remotes."""
