"""Moondream as a tool for AI agents: an MCP server in front of the service's /v1 routes."""
