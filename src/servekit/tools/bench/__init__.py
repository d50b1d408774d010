"""`servekit bench`: a load generator for TF Serving REST, KServe V2 REST and V2 gRPC servers."""
