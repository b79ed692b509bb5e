"""FastAPI app: REST under /v1. Never imports torch."""
