"""Dagster definitions, one module per lifecycle stage (the module name is the asset group)."""
