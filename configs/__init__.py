"""Typed configuration: pydantic models (one per stage) and the YAML recipes that fill them."""
