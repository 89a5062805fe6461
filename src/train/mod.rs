//! Training loops: SGD with schedules, checkpoints, resumption, divergence handling and metrics.
