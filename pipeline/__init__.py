"""Ray batch pipeline: YAML job spec -> Ray Data actor pool over the dllm_cache_core Engine -> Parquet.

Importing the package imports nothing heavy (no Ray, no torch): `pipeline.spec`, `pipeline.overrides`
and `pipeline.scoring` are reused by the eval harness on machines without Ray.
"""
