"""The gRPC servers: the worker's and the router's servicers on one shared create/serve/drain, with the
interceptors (auth, limits, errors, metrics) and TLS they share."""
