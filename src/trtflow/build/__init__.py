"""The build wing: turns a checkpoint into plans (data sets, the checked detector's export, head weights, calibration and Q/DQ, the API-built head, the engine stage)."""
