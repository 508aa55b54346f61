"""Write: the project's Flags onto the server (diff, versioned PUTs), their alerts, and `leukofhir load`."""
