"""Agent runtime: model selection, the bundled local model and reply cleaning."""
