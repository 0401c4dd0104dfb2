"""SLO-driven provisioning over heterogeneous accelerators."""
