"""``python -m agent_network`` runs the CLI."""

from agent_network.cli import app

app()
