"""`servekit batch`: score files offline with a model folder, locally or on Apache Spark."""
