"""Handwritten kernel shared by every server and client: errors, ids, telemetry, server and channel set-up."""
