"""Finding, loading and preparing models."""
