# record_golden.py runs the third-party reference code (from the git-ignored .refs/) in its own
# environment; it is a script, never a test module.
collect_ignore = ["record_golden.py"]
