"""trimtab's controller daemon: per-job signal state, policies, governor, journal, metrics."""
