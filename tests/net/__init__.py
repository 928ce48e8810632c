"""A network test bed built from Linux network namespaces: hosts, a routed "internet", NAT, TURN."""
