"""Prefect flows (wiring of tasks) and the ``transfusion`` command line."""
