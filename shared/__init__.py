"""Code shared by the ingestor and the edge; imports nothing else of fxproxy."""
