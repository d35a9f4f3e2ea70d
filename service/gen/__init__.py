"""Generated gRPC stubs (make proto); never edit by hand."""
