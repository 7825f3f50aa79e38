"""What wraps the transports for operators: the proxy and its configuration."""
