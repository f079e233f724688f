"""The pure core of trio_cluster: deterministic logic, free of I/O and of Trio."""
