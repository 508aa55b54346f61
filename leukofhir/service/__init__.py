"""What every HTTP service of leukofhir shares: connections, bodies and logs that hold against a hostile client."""
