"""Recipe search: the pure half, independent of any orchestrator.

`spec` turns a search spec into candidate recipes, `select` picks one from measured candidates,
`report` renders the outcome, `trend` follows releases of a model over its versions. Nothing here
runs a step: the orchestration (local runs, KFP ParallelFor, Airflow .expand) calls these.
"""
