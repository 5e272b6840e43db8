"""The tools around the pipeline: the `etl-assets` command, its runner, the drill, the bench
and the sample generator."""
