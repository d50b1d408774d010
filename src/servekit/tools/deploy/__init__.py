"""Deployment manifests for running servekit on Kubernetes."""
