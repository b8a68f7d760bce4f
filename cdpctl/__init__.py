"""cdpctl: the operator CLI of cdp (health, status, PKI, keys) and the local lab launcher."""
