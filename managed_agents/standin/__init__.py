"""A stand-in for Claude: a local HTTP server speaking the Messages API that plays scripted turns."""
