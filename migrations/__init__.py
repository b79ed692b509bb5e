"""Alembic migrations against jobs' metadata (`quantfoundry db upgrade`)."""
