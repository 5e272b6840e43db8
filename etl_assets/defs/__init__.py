"""What Dagster loads: the assets, checks, jobs, sensors, schedule and resources.

Asset bodies are thin: the work is in `etl_assets.lib`. Nothing here imports `etl_assets.tools`.
"""
