"""Prefect flows: one per stage plus the end-to-end pipeline, and the `pomona` CLI."""

from configs.settings import prepare_environment

prepare_environment()
