"""The pure library: schema, rules, validation, staging, sharding, the warehouse, fault points.

Nothing here imports Dagster, `etl_assets.defs` or `etl_assets.tools` (a test holds it).
"""
