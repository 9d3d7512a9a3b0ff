"""Each heavy job's typed config and ``run_*`` function, imported when its command runs."""
