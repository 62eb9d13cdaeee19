"""Ray batch pipeline: YAML job spec -> Ray Data actor pool over the dllm_cache_core Engine -> Parquet.

`pipeline.build_processor(ProcessorConfig(...))` is the generation stage alone, for one's own Ray Data
pipelines (run_job.py wraps the same stage in a job). Importing the package imports no Ray:
`pipeline.spec` validates specs on any machine. The dotted
overrides and the scorers live in dllm_cache_core (`overrides`, `scoring`) so that the eval harness,
which must not import the pipeline, uses the same code.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ProcessorConfig", "ProcessorConfigError", "Processor", "build_processor"]


def __getattr__(name: str) -> Any:
    # the Ray Data stage (pipeline.processor), imported on first use so that `import pipeline.spec`
    # stays as light as before
    if name in __all__:
        from . import processor

        return getattr(processor, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
