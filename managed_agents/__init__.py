"""Shared wire contract (generated `managed_agents.v1`) and the mesh plumbing every service uses."""
