"""Ray batch pipeline: YAML job spec -> Ray Data actor pool over the dllm_cache_core Engine -> Parquet.

Importing the package imports no Ray: `pipeline.spec` validates specs on any machine. The dotted
overrides and the scorers live in dllm_cache_core (`overrides`, `scoring`) so that the eval harness,
which must not import the pipeline, uses the same code.
"""
