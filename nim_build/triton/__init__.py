"""Triton serving: model repository generator (repo), server lifecycle (server) and client (client)."""
