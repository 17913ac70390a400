"""Batch jobs on top of the engine: prompt files in; images, manifest and run.json out."""
