"""Who a node is: account and device keys, certificates, devices and their revocation."""
