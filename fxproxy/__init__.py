"""fxproxy command line: the processes (edge, ingestor), dev tools (simfeed, demo, tail), admin."""
