"""Sandbox backends: one module per engine, each implementing `hands.backend.SandboxBackend`."""
