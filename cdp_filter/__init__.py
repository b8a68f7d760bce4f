"""cdp-filter: FUSE capture shim, write journal and shipper (source host)."""
