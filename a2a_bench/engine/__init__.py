"""The sweep engine: the grid, the seeded workloads, one point's measurement and verification, the search,
the driver with its run folder, lock, watchdog and lifeline."""
