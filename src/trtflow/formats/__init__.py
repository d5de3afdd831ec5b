"""The files the two wings meet through, each with its format version: head weights, the recorded network definition, the plan's metadata."""
