"""CLI subcommands, one module per area; ``agent.cli`` only parses and dispatches."""
