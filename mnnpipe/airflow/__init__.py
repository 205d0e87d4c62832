"""Airflow adapter: one operator per mnnpipe step, generated from the step's Spec.

Airflow imports `provider.get_provider_info` whenever it discovers providers, so this package
imports nothing heavy at import time; `operators`, `sensors` and `triggers` import Airflow.
"""
