"""muxc's planner: the cost model (this part), later partitioning, fusion and scheduling."""
