"""The code location's pipelines: one folder per `etl_assets.component.DeclaredPipeline`
instance, its `defs.yaml` holding (or naming) its declaration (`dg scaffold defs` adds one)."""
