"""Prefect tasks: thin wrappers that turn library calls into observable, retryable steps."""
