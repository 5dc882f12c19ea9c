"""The wire contract (msgspec schemas) and transport helpers. Knows nothing about models."""
