"""Turn runs into tables and figures. Reads the files each run writes (config.json, summary.json)."""
