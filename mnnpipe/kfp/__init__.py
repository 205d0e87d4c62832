"""Kubeflow Pipelines adapter: components and the `compress` pipeline, generated from step Specs.

`interface` and `launcher` import nothing from kfp (the step image does not ship it); the rest
(`components`, `pipeline`, `schedule`, `generate`) needs the `kfp` extra.
"""
