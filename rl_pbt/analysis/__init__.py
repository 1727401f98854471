"""After a run: the lineage of each trial, the winning schedule, plots and the report."""
