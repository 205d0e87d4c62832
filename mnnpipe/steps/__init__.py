"""The steps. Each module defines a `Spec`, a `Result` and a pure `run(spec, ctx) -> Result`, and
ends with one `mnnpipe.catalog.register(...)` call that declares its roles (the model it reads,
what it hands on, its stage in a recipe). Dropping a module here is all it takes to add a step:
the catalog finds it, and the CLI, schema, KFP component, Airflow operator and recipe follow.

A step imports torch and MNN inside `run`, so listing the steps (`mnnpipe schema`, an Airflow
scheduler parsing a DAG) does not pay for them.
"""
