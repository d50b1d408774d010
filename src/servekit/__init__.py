"""servekit: serve versioned models over TF Serving REST and KServe V2."""

__version__ = "0.1.0"
