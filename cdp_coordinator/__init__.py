"""cdp-coordinator: the control plane (registry, leases, assignments, RPO monitoring)."""
