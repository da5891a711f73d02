"""Tests of the egress relay: API keys a sandbox uses only as placeholders."""
