"""Evaluate: validate, the rules, the Flags they make, run in memory or by partition, and the run's files."""
