"""gRPC servers, interceptors, client SDK and CLI over the personalize library."""
