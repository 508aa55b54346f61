"""leukofhir: FHIR R4 leukopenia surveillance pipeline."""
